"""Load test of ``mm15 serve``: N concurrent clients for a bounded time against a loopback server.

By default it saves the tiny preset (random weights; ``--preset smol``: the bundled SmolLM2 behind a
random encoder) to a temporary directory, starts ``mm15 serve`` on it as a subprocess on a free loopback
port, and runs ``--clients`` threads, each sending chat completions one after another for ``--duration``
seconds over its own keep-alive connection. Half the requests carry a 320 x 240 PNG (``--images``).
``--url`` targets a server that is already running (loopback only) instead.

It checks that every request succeeded (exit status 1 otherwise) and prints the machine, the setup
and a table: requests, failures, p50/p95 latency, requests/s, generated tokens/s, and the mean
number of rows the server decoded together per step (from /health).

Usage: ``python benchmarks/serve_load.py [--preset tiny|smol] [--clients 4] [--duration 30] [--max-tokens 16]
[--images none|half|all] [--max-batch 8] [--url http://127.0.0.1:8000 --model NAME]``; see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import ipaddress
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(host: str, port: int, path: str, timeout: float = 5.0) -> dict:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return json.loads(response.read())
    finally:
        connection.close()


def start_local_server(name: str, max_batch: int, work: Path) -> tuple[subprocess.Popen, int]:
    """The preset ``name`` behind ``mm15 serve`` in a subprocess, served as model id ``name``; returns once
    /health answers."""
    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset

    model_dir = work / name
    MM15Model.build(preset(name)).save_pretrained(model_dir)
    port = free_port()
    command = [sys.executable, "-m", "mm15.cli", "serve", "--model", str(model_dir), "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--model-name", name]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read() if server.stderr else ''}")
        try:
            get_json("127.0.0.1", port, "/health", timeout=1)
            return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def image_url() -> str:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((320, 240)).convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class ClientResult:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)


def run_client(
    host: str,
    port: int,
    model: str,
    deadline: float,
    max_tokens: int,
    images: str,
    index: int,
    key: str | None,
) -> ClientResult:
    result = ClientResult()
    picture = image_url()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection = http.client.HTTPConnection(host, port, timeout=120)
    sent = 0
    while time.monotonic() < deadline:
        with_image = images == "all" or (images == "half" and (sent + index) % 2 == 0)
        question = f"client {index} question {sent}: what is in the picture?"
        content: list[dict] = [{"type": "text", "text": question}]
        if with_image:
            content.insert(0, {"type": "image_url", "image_url": {"url": picture}})
        body = json.dumps(
            {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        )
        sent += 1
        start = time.perf_counter()
        try:
            connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = connection.getresponse()
            document = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as err:
            result.failures.append(f"{type(err).__name__}: {err}")
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=120)
            continue
        elapsed = time.perf_counter() - start
        if response.status != 200:
            result.failures.append(f"HTTP {response.status}: {document}")
            continue
        result.latencies.append(elapsed)
        result.tokens += int(document["usage"]["completion_tokens"])
    connection.close()
    return result


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", choices=("tiny", "smol"), default="tiny", help="the model this script serves"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--images", choices=("none", "half", "all"), default="half")
    parser.add_argument("--max-batch", type=int, default=8, help="for the server this script starts")
    parser.add_argument("--url", help="an already running server on loopback (default: start one)")
    parser.add_argument("--model", help="model id with --url (default: --preset)")
    parser.add_argument("--api-key", default=os.environ.get("MM15_API_KEY"))
    args = parser.parse_args()

    server = None
    with tempfile.TemporaryDirectory() as work:
        if args.url:
            parts = urlsplit(args.url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
                parser.error("--url must be a loopback address: this load test only targets this machine")
        else:
            server, port = start_local_server(args.preset, args.max_batch, Path(work))
            host = "127.0.0.1"
        try:
            before = get_json(host, port, "/health")
            deadline = time.monotonic() + args.duration
            results: list[ClientResult] = [ClientResult() for _ in range(args.clients)]

            def work_for(index: int) -> None:
                results[index] = run_client(
                    host,
                    port,
                    args.model or args.preset,
                    deadline,
                    args.max_tokens,
                    args.images,
                    index,
                    args.api_key,
                )

            threads = [threading.Thread(target=work_for, args=(i,)) for i in range(args.clients)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            after = get_json(host, port, "/health")
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)

    latencies = [x for r in results for x in r.latencies]
    failures = [f for r in results for f in r.failures]
    tokens = sum(r.tokens for r in results)
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    target = f"at {args.url}" if args.url else f"{args.preset} preset, max batch {args.max_batch}"
    print(
        f"setup: {args.clients} clients x {args.duration:.0f} s, max_tokens {args.max_tokens}, "
        f"images {args.images}, server {target}"
    )
    print()
    print("| requests | failures | p50 latency | p95 latency | requests/s | tokens/s | rows per step |")
    print("|---|---|---|---|---|---|---|")
    if latencies:
        print(
            f"| {len(latencies)} | {len(failures)} | {percentile(latencies, 50) * 1e3:.0f} ms | "
            f"{percentile(latencies, 95) * 1e3:.0f} ms | {len(latencies) / wall:.1f} | {tokens / wall:.0f} | "
            f"{rows / max(1, steps):.2f} |"
        )
    else:
        print(f"| 0 | {len(failures)} | - | - | 0 | 0 | - |")
    for failure in failures[:10]:
        print(f"failure: {failure}")
    if failures or not latencies:
        print("FAILED: not every request succeeded")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
