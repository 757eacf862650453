"""Does a trained model read its prompt? ``mm15.eval.probes``' two probes on a saved model directory.

Not a speed comparison but a diagnostic for the demo's zero in referring and grounding (README,
docs/demo.md): for held-out grounding questions, is the answer that repeats the asked object's name
likelier than the same answer with another object's name; and do the model's answers to word-sorting
questions use the question's words (``mm15/eval/probes.py`` says exactly how each is scored).

Usage: ``python benchmarks/context_use.py --model runs/demo/tiny/sft/final [--items 40]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mm15.eval.probes import context_use
from mm15.model.mm15 import MM15Model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved mm15 model directory")
    parser.add_argument("--items", type=int, default=40, help="held-out items per probe")
    args = parser.parse_args()
    if args.items < 1:
        parser.error("--items must be >= 1")
    result = context_use(MM15Model.from_pretrained(args.model).eval(), args.items)
    print(f"model: {args.model}")
    print("\n".join(result.table()))


if __name__ == "__main__":
    main()
