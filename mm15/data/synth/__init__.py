"""The synthetic data engine: one generator family per MM1.5 data category, deterministic from a seed.

A generator is a function ``(rng: random.Random, index: int) -> Sample`` registered under a name with
``@register(name, category)``; the sample carries its ground truth in ``Sample.truth``. Train and
held-out evaluation data come from disjoint seed streams (``sample_seed``). A generator whose samples
are text alone, from a small space (``text-only``: made-up words of a few syllables, small products),
would still repeat a training sample in the held-out split now and then; it is registered with
``text_split=True`` and its samples are split by their text as well: a hash of the conversation (or
of ``truth["split_text"]``, the conversation without an answer-format suffix, when the sample records
one; ``text_split_of``) puts each one in the train or the eval split, and ``generate`` draws again until
the sample's text belongs to the split asked for. Modules register their generators when imported;
``generators()`` imports them all.
"""

from __future__ import annotations

import hashlib
import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mm15.data.sample import CATEGORIES, Sample

Split = Literal["train", "eval"]
GeneratorFn = Callable[[random.Random, int], Sample]

# Modules holding generators; importing one registers its generators.
GENERATOR_MODULES = ("mm15.data.synth.scenes", "mm15.data.synth.documents")


@dataclass(frozen=True)
class Generator:
    name: str
    category: str
    fn: GeneratorFn
    description: str
    text_split: bool = False


_REGISTRY: dict[str, Generator] = {}


def register(name: str, category: str, *, text_split: bool = False) -> Callable[[GeneratorFn], GeneratorFn]:
    """Register ``fn`` as generator ``name`` of MM1.5 category ``category``; its docstring describes it.

    ``text_split``: split its samples between train and eval by their text too (module docstring).
    """
    if category not in CATEGORIES:
        raise ValueError(f"generator {name!r}: unknown category {category!r} (one of {CATEGORIES})")

    def wrap(fn: GeneratorFn) -> GeneratorFn:
        if name in _REGISTRY:
            raise ValueError(f"generator {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Generator(name, category, fn, doc[0] if doc else "", text_split)
        return fn

    return wrap


def generators() -> dict[str, Generator]:
    """Every registered generator, by name."""
    for module in GENERATOR_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def synth_names(name: str) -> list[str]:
    """Generator names for ``name``: one generator, or every generator of a category (sorted)."""
    registry = generators()
    if name in registry:
        return [name]
    names = sorted(n for n, g in registry.items() if g.category == name)
    if not names:
        raise ValueError(
            f"{name!r} is neither a generator ({', '.join(sorted(registry))}) nor a category with "
            f"generators ({', '.join(sorted({g.category for g in registry.values()}))})"
        )
    return names


def sample_seed(name: str, split: Split, index: int, seed: int = 0) -> int:
    """The seed of sample ``index`` of generator ``name``: a hash of all four, so splits never collide."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    digest = hashlib.sha256(f"{name}|{split}|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def text_split_of(sample: Sample) -> Split:
    """The split a sample's text belongs to, for ``text_split`` generators: one in ten texts is eval's.

    The text is the conversation (``role: content`` lines), or ``truth["split_text"]`` when the sample
    records one: the conversation without what does not make it another sample (a word problem's
    answer-format suffix, "Answer with just the number."), so that its variants all fall in one split.
    """
    key = sample.truth.get("split_text")
    text = key if isinstance(key, str) else "\n".join(f"{turn.role}: {turn.content}" for turn in sample.turns)
    return "eval" if hashlib.sha256(text.encode()).digest()[0] < 26 else "train"


def draw(generator: Generator, rng: random.Random, index: int, split: Split) -> Sample:
    """``generator``'s sample from ``rng``; for a ``text_split`` one, the first whose text is ``split``'s."""
    sample = generator.fn(rng, index)
    while generator.text_split and text_split_of(sample) != split:  # about 1 in 10 texts is eval's
        sample = generator.fn(rng, index)
    return sample


def generate(name: str, index: int, split: Split = "train", seed: int = 0) -> Sample:
    """Sample ``index`` of generator ``name`` in ``split``: the same arguments always give the same sample."""
    registry = generators()
    if name not in registry:
        raise ValueError(f"unknown generator {name!r}; choose one of {sorted(registry)}")
    sample = draw(registry[name], random.Random(sample_seed(name, split, index, seed)), index, split)
    sample.id = f"{name}/{split}/{seed}/{index}"
    sample.source = f"synth/{name}"
    sample.validate()
    return sample
