"""Running the API with uvicorn: in the foreground (``mm15 serve``) or on a background thread.

Both bind the socket themselves (``bind_socket``) before uvicorn starts: ``mm15 serve`` so that an
address in use or a host that does not resolve is reported before the model is loaded, which can take
minutes, and ``start_server`` so that a caller asking for port 0 learns the real port with no window for
another process to take it (tests and the load benchmark).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from mm15.model.mm15 import MM15Model
from mm15.serve.api import create_app
from mm15.serve.engine import Engine
from mm15.serve.settings import ServeSettings

log = logging.getLogger("mm15.serve")


def load_engine(model_dir: Path, max_batch: int = 8, batch_window_s: float = 0.01) -> Engine:
    """The model of ``model_dir`` behind a started engine (``FileNotFoundError`` / ``ValueError`` if bad)."""
    model = MM15Model.from_pretrained(model_dir)
    return Engine(model, max_batch=max_batch, batch_window_s=batch_window_s).start()


def _config(app: FastAPI, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        server_header=False,
        # Keep-alive connections of idle clients are closed soon: they hold server resources.
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )


class BindError(OSError):
    """The address cannot be listened on: a host that does not resolve, a port in use or not allowed."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (IPv4 or IPv6, as the host resolves); ``BindError`` if not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as err:  # a name that is not a valid hostname fails in its idna encoding
        raise BindError(f"{host!r} does not resolve ({getattr(err, 'strerror', None) or err})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise BindError(err.strerror or str(err)) from None
    return sock


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve on the bound ``sock`` in the foreground until interrupted."""
    host, port = sock.getsockname()[:2]
    # uvicorn names the address only when it binds the socket itself; say where the server is.
    shown = f"[{host}]" if ":" in host else host
    print(f"mm15 serve: listening on http://{shown}:{port} (the web page is at /; Ctrl+C stops)", flush=True)
    uvicorn.Server(_config(app, host, port, log_level)).run(sockets=[sock])


@dataclass
class RunningServer:
    """A server on a background thread; ``stop()`` shuts it down and waits for the thread."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 20.0
) -> RunningServer:
    """Serve ``app`` on a thread; port 0 picks a free port. Returns once the server accepts connections."""
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, host, bound_port, log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mm15-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{bound_port}")
        time.sleep(0.02)
    return RunningServer(server, thread, host, bound_port)


def serve_model_dir(
    model_dir: Path, settings: ServeSettings, host: str, port: int, max_batch: int = 8
) -> None:
    """``mm15 serve``: bind, load, start the engine, serve until interrupted, stop the engine.

    ``BindError`` when the address cannot be bound, before the model is loaded; the model's own
    errors (``FileNotFoundError``, ``ValueError``, other ``OSError``) after.
    """
    sock = bind_socket(host, port)
    try:
        engine = load_engine(model_dir, max_batch=max_batch)
        try:
            run(create_app(engine, settings), sock)
        finally:
            engine.close()
    finally:
        sock.close()
