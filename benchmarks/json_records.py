"""Reading a large LLaVA ``.json`` annotation array: ``json.loads`` of the whole file against mm15's
record-at-a-time parse (``mm15.data.sources._json_array``, what ``mm15 data pack`` reads through).

A synthetic LLaVA-style file of ``--records`` records (one line, as LLaVA ships its mixtures) is written
to a temporary folder; each reader then runs in a fresh process, counts the records, and reports its
time and how much its peak resident memory grew past what the process held before reading (the
imports, torch's included). Usage: ``python benchmarks/json_records.py [--records 300000] [--rounds 2]``;
see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

READER = """
import json, resource, sys, time
from pathlib import Path
from mm15.data.sources import _json_array
path, how = Path(sys.argv[1]), sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
records = json.loads(path.read_text(encoding="utf-8")) if how == "json.loads" else _json_array(path)
count = sum(1 for _ in records)
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"records": count, "seconds": seconds, "peak_growth_mb": grown}))
"""


def write_file(path: Path, records: int) -> None:
    answer = "A long answer " * 20
    rows = [
        {
            "id": f"r{i}",
            "image": f"coco/{i:012d}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown in this picture? Describe it in detail."},
                {"from": "gpt", "value": answer},
            ],
        }
        for i in range(records)
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")


def measure(path: Path, how: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", READER, str(path), how], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llava.json"
        write_file(path, args.records)
        size = path.stat().st_size / 1e6
        print(f"{args.records:,} records, {size:.0f} MB, one line; {args.rounds} rounds, alternated")
        print("| reader | round | records | seconds | peak memory growth (MB) |")
        print("|---|---|---|---|---|")
        for round_ in range(1, args.rounds + 1):
            for how in ("json.loads", "record at a time"):
                row = measure(path, how)
                print(
                    f"| {how} | {round_} | {row['records']:,} | {row['seconds']:.2f} | "
                    f"{row['peak_growth_mb']:.0f} |"
                )


if __name__ == "__main__":
    main()
