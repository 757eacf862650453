"""Data mixtures: weighted trees of sources, their effective probabilities and a resumable sampler.

A mixture is a tree (``MixtureNode``). A leaf names a source (a data category such as ``"text-rich"`` or a
data set such as ``"pdfa"``) and an inner node groups children. Weights are relative among siblings: a
child's share of its parent is ``weight / sum(sibling weights)``, and a leaf's effective probability
(``effective_weights``) is the product of the shares on its path. Recipes write mixtures as nested
mappings (``MixtureNode.from_dict``), e.g.::

    {"single-image": {"weight": 0.8, "children": {"text-rich": 37.2, "general": 11.3}},
     "multi-image": 0.1,
     "text-only": 0.1}

and a bad mixture fails at start-up with a ``ValueError`` naming the offending path, e.g.
``mixture.single-image.math: weight must be >= 0, got -1``.

The presets are MM1.5's three stages (mm15-spec.md section 3): ``pretrain_mixture`` (caption :
interleaved : text = 50 : 10 : 40), ``ocr_mixture`` (continual pre-training, sources equal per batch) and
``sft_mixture`` (single / multi-image / text-only = 0.8 / 0.1 / 0.1 with the alpha ratios inside
single-image).

``MixtureSampler`` turns a mixture into a deterministic infinite stream of source names. It is
counter-based: draw ``i`` of rank ``r`` is a pure function of ``(seed, r, i)`` (a keyed BLAKE2b hash mapped
to a uniform in [0, 1) and looked up in the cumulative distribution), so the whole sampler state is a few
counters; ``state_dict()`` is small, JSON-serialisable, and ``load_state_dict()`` continues the identical
sequence. ``next_batch`` is the "balanced per batch" mode used for the OCR stage (rule in its docstring).
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from mm15.data.sample import CATEGORIES

# Name of the root node, so error paths read "mixture.single-image.math".
ROOT = "mixture"

# Stage 1 (mm15-spec.md 3.1): caption : interleaved : text = 50 : 10 : 40.
PRETRAIN_WEIGHTS: dict[str, float] = {"caption": 50.0, "interleaved": 10.0, "text": 40.0}

# Stage 2 (mm15-spec.md 3.2): the four OCR data sets, sampled equally per batch.
OCR_SOURCES: tuple[str, ...] = ("pdfa", "idl", "rendered-text", "docstruct-4m")

# Stage 3 (mm15-spec.md 3.3): top-level weights, and per-batch ratios general : c = 1 : alpha_c inside
# single-image data. Text-rich is not given an alpha; its share comes from the spec's final table.
SFT_TOP_WEIGHTS: dict[str, float] = {"single-image": 0.8, "multi-image": 0.1, "text-only": 0.1}
SFT_ALPHA: dict[str, float] = {"general": 1.0, "refer-ground": 2.0, "math": 0.5, "code": 0.2, "science": 0.1}
SFT_TEXT_RICH_PERCENT = 37.2

# Domain tags of the hashes, so the per-draw, per-shuffle and ordering streams never reuse an input.
_TAG_DRAW = 0
_TAG_SHUFFLE = 1

STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- config


def _check_weight(path: str, weight: Any) -> float:
    # bool is an int subclass; "weight: true" in YAML is a mistake, not a weight of 1.
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ValueError(f"{path}: weight must be a number, got {weight!r}")
    if not math.isfinite(weight):
        raise ValueError(f"{path}: weight must be a finite number, got {weight}")
    if weight < 0:
        raise ValueError(f"{path}: weight must be >= 0, got {weight}")
    return float(weight)


def _check_children(path: str, children: tuple[MixtureNode, ...]) -> None:
    if not children:
        raise ValueError(f"{path}: group has no children")
    names = [c.name for c in children]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate child names {duplicates}")
    if all(c.weight == 0 for c in children):
        raise ValueError(f"{path}: children weights are all zero (nothing could be sampled)")


@dataclass(frozen=True)
class MixtureNode:
    """A leaf (``children is None``: ``name`` is the source) or a group of children, with a relative weight.

    ``children=()`` is an empty group and is rejected, so a typo that empties a group cannot silently turn it
    into a source. Construction validates this node; ``from_dict`` validates while building, so its errors
    carry the full path from the root.
    """

    name: str
    weight: float = 1.0
    children: tuple[MixtureNode, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"MixtureNode.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "weight", _check_weight(self.name, self.weight))
        if self.children is not None:
            children = tuple(self.children)
            for child in children:
                if not isinstance(child, MixtureNode):
                    raise ValueError(f"{self.name}: children must be MixtureNode, got {type(child).__name__}")
            _check_children(self.name, children)
            object.__setattr__(self, "children", children)

    @property
    def is_leaf(self) -> bool:
        return self.children is None

    @classmethod
    def from_dict(
        cls, spec: Mapping[str, Any], available: Collection[str] | None = None, name: str = ROOT
    ) -> MixtureNode:
        """Build the root group from ``{name: weight | {"weight": w, "children": {...}}}``.

        A value that is a number is a leaf; a mapping with ``children`` is a group (``weight`` defaults to 1);
        a mapping with only ``weight`` is a leaf. If ``available`` is given, every leaf must name one of them.
        """
        if not isinstance(spec, Mapping):
            raise ValueError(f"{name}: a mixture is a mapping of names to weights or groups, got {spec!r}")
        root = cls(name, 1.0, _parse_children(name, spec))
        if available is not None:
            root.check_sources(available)
        return root

    def to_dict(self) -> dict[str, Any]:
        """The inverse of ``from_dict`` for a group (the children mapping)."""
        if self.children is None:
            raise ValueError(f"{self.name}: to_dict() needs a group, this node is a leaf")
        return {c.name: _to_value(c) for c in self.children}

    def check_sources(self, available: Collection[str], path: str | None = None) -> None:
        """Raise ``ValueError`` naming the path of the first leaf whose source is not in ``available``."""
        path = path or self.name
        if self.children is None:
            if self.name not in available:
                known = sorted(available)
                shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
                raise ValueError(f"{path}: unknown source {self.name!r} (available: {shown})")
            return
        for child in self.children:
            child.check_sources(available, f"{path}.{child.name}")

    def leaves(self, path: str | None = None, prob: float = 1.0) -> Iterator[tuple[str, MixtureNode, float]]:
        """Every leaf as ``(path, node, effective probability)``, in tree order."""
        path = path or self.name
        if self.children is None:
            yield path, self, prob
            return
        weights = [c.weight for c in self.children]
        total = sum(weights)
        if not math.isfinite(total):
            # Two weights of 1e308 sum to inf and every share would become 0: divide by the largest
            # first (only then, so every other mixture's probabilities stay bit for bit what they were).
            largest = max(weights)
            weights = [w / largest for w in weights]
            total = sum(weights)
        for child, weight in zip(self.children, weights, strict=True):
            yield from child.leaves(f"{path}.{child.name}", prob * weight / total)


def _parse_children(path: str, spec: Mapping[str, Any]) -> tuple[MixtureNode, ...]:
    children = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{path}: child names must be non-empty strings, got {key!r}")
        children.append(_parse(key, value, f"{path}.{key}"))
    out = tuple(children)
    _check_children(path, out)
    return out


def _parse(name: str, value: Any, path: str) -> MixtureNode:
    if not isinstance(value, Mapping):
        return MixtureNode(name, _check_weight(path, value))
    if not value:
        # "name: {}" in YAML reads as an emptied group, not as a leaf of weight 1.
        raise ValueError(f"{path}: group has no children")
    unknown = sorted(set(value) - {"weight", "children"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (a group is {{'weight': w, 'children': {{...}}}})")
    weight = _check_weight(path, value.get("weight", 1.0))
    if "children" not in value:
        return MixtureNode(name, weight)
    spec = value["children"]
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: children must be a mapping of names to weights or groups, got {spec!r}")
    return MixtureNode(name, weight, _parse_children(path, spec))


def _to_value(node: MixtureNode) -> Any:
    if node.children is None:
        return node.weight
    return {"weight": node.weight, "children": node.to_dict()}


def effective_weights(node: MixtureNode) -> dict[str, float]:
    """Each source's probability of being drawn, in tree order; a source listed twice gets the sum."""
    out: dict[str, float] = {}
    for _, leaf, prob in node.leaves():
        out[leaf.name] = out.get(leaf.name, 0.0) + prob
    return out


# --------------------------------------------------------------------------------------------- presets


def pretrain_mixture() -> MixtureNode:
    """Stage 1: caption : interleaved : text = 50 : 10 : 40."""
    return MixtureNode.from_dict(PRETRAIN_WEIGHTS, available=CATEGORIES)


def ocr_mixture(sources: Collection[str] = OCR_SOURCES) -> MixtureNode:
    """Stage 2: the OCR data sets at equal weight (draw them with ``MixtureSampler.next_batch``)."""
    return MixtureNode.from_dict(dict.fromkeys(sources, 1.0))


def sft_single_image_weights() -> dict[str, float]:
    """The single-image category weights, relative to general (= 1), derived from the alphas and text-rich.

    Single-image is 80% of SFT samples and text-rich 37.2% (spec table), so the alpha-weighted categories
    share 80 - 37.2 = 42.8%. They are general * (1 + 2.0 + 0.5 + 0.2 + 0.1) = 3.8 * general, hence
    general = 42.8 / 3.8 = 11.263%, refer-ground = 22.526%, math = 5.632%, code = 2.253%, science = 1.126%,
    which round to the table's 11.3 / 22.5 / 5.6 / 2.3 / 1.1. Text-rich relative to general is
    37.2 / 11.263 = 3.8 * 37.2 / 42.8 = 3.3028. (Fixing general at 11.3 instead would give refer-ground
    22.6 and text-rich 37.06, off the table; fixing text-rich reproduces every entry.)
    """
    single = SFT_TOP_WEIGHTS["single-image"] * 100.0
    rest = single - SFT_TEXT_RICH_PERCENT
    text_rich = sum(SFT_ALPHA.values()) * SFT_TEXT_RICH_PERCENT / rest
    return {"text-rich": text_rich, **SFT_ALPHA}


def sft_mixture() -> MixtureNode:
    """Stage 3: single-image 0.8 (alpha ratios inside), multi-image 0.1, text-only 0.1."""
    spec = {
        "single-image": {"weight": SFT_TOP_WEIGHTS["single-image"], "children": sft_single_image_weights()},
        "multi-image": SFT_TOP_WEIGHTS["multi-image"],
        "text-only": SFT_TOP_WEIGHTS["text-only"],
    }
    return MixtureNode.from_dict(spec, available=CATEGORIES)


# --------------------------------------------------------------------------------------------- sampler


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MixtureSampler.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"MixtureSampler.{name} must be >= {minimum}, got {value}")
    return value


def _key(*parts: object) -> bytes:
    return hashlib.blake2b("/".join(map(str, ("mm15.mixture", *parts))).encode(), digest_size=32).digest()


def _hash64(key: bytes, *counters: int) -> int:
    msg = b"".join(c.to_bytes(8, "little") for c in counters)
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8, key=key).digest(), "little")


class MixtureSampler:
    """A deterministic, resumable, per-rank infinite stream of source names drawn from a mixture.

    Draw ``i`` of rank ``r`` uses the uniform ``u = blake2b_key(seed, r)(tag, i) >> 11 / 2**53`` and picks the
    source whose interval of the cumulative distribution holds ``u``. Ranks therefore have independent
    streams (different hash keys), each reproducible from ``(seed, rank)`` alone, and the state is just the
    counters: restoring them continues the identical sequence with no RNG state to serialise.
    """

    def __init__(self, node: MixtureNode, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not isinstance(node, MixtureNode):
            raise ValueError(f"MixtureSampler.node must be a MixtureNode, got {type(node).__name__}")
        self.node = node
        self.seed = _check_int("seed", seed, -(2**63))
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"MixtureSampler.rank must be < world_size ({world_size}), got {rank}")
        self.probs = effective_weights(node)
        positive = [(s, p) for s, p in self.probs.items() if p > 0]
        self._table = [s for s, _ in positive]
        self._cum = list(accumulate(p for _, p in positive))
        # Float sums may end at 0.99999...; pinning the end to 1 keeps every u in [0, 1) inside the table.
        self._cum[-1] = 1.0
        self._key = _key(seed, "rank", rank)
        # The balanced cycle order is shared by all ranks (not per rank) so their slices tile one cycle.
        shared = _key(seed, "shared")
        self._order = sorted(self._table, key=lambda s: hashlib.blake2b(s.encode(), key=shared).digest())
        self._step = 0  # draws made by next()
        self._batch = 0  # calls of next_batch()
        self._slot = 0  # where rank 0's next next_batch() window starts in the balanced cycle
        self._counts = dict.fromkeys(self.probs, 0)

    # -- drawing

    def next(self) -> str:
        """The next source name of this rank's stream."""
        u = (_hash64(self._key, _TAG_DRAW, self._step) >> 11) * 2.0**-53
        source = self._table[bisect_right(self._cum, u)]
        self._step += 1
        self._counts[source] += 1
        return source

    def __next__(self) -> str:
        return self.next()

    def __iter__(self) -> Iterator[str]:
        return self

    def take(self, n: int) -> list[str]:
        """The next ``n`` draws of ``next()``."""
        return [self.next() for _ in range(n)]

    def next_batch(self, batch_size: int) -> list[str]:
        """Source names for this rank's next batch, balanced across sources (MM1.5's OCR stage).

        Exact rule: the K sources of positive weight are put in one fixed order derived from the seed (the
        same on every rank) and repeated cyclically. Each rank walks that cycle ``batch_size`` slots per
        call, rank r ``r * batch_size`` slots ahead of rank 0: call ``b`` of rank r takes slots
        [(b + r) * batch_size, (b + r + 1) * batch_size), shuffled (by a hash of (seed, rank, b)) so
        sources do not arrive in a fixed pattern. Consequences: every rank's calls are consecutive windows
        of the cycle, so its running totals per source never differ by more than 1 and every rank draws
        every source (each rank reads only its own slice of a source, so a rank that never drew a source
        would leave that slice unread); the ranks' batches of one call together are N = batch_size *
        world_size consecutive slots, so in every batch, of one rank or of all ranks together, each source
        appears floor(n / K) or ceil(n / K) times (exactly n / K when K divides n). With one rank this is
        the cycle read straight through. All ranks must call with the same ``batch_size``. Needs equal
        effective weights, which is what "sampled equally per batch" means; ``next()`` serves unequal
        mixtures.
        """
        batch_size = _check_int("batch_size", batch_size, 1)
        probs = [self.probs[s] for s in self._table]
        if max(probs) - min(probs) > 1e-9 * max(probs):
            raise ValueError(
                f"{self.node.name}: next_batch() needs equal effective weights, got "
                + ", ".join(f"{s}={p:.4g}" for s, p in zip(self._table, probs, strict=True))
            )
        k = len(self._order)
        start = self._slot + self.rank * batch_size
        out = [self._order[(start + j) % k] for j in range(batch_size)]
        # Fisher-Yates with counter-based indices: the shuffle is a function of (seed, rank, batch) only.
        for i in range(batch_size - 1, 0, -1):
            j = _hash64(self._key, _TAG_SHUFFLE, self._batch, i) % (i + 1)
            out[i], out[j] = out[j], out[i]
        self._slot += batch_size  # rank 0's next window; rank r stays r windows ahead
        self._batch += 1
        for source in out:
            self._counts[source] += 1
        return out

    # -- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state; ``load_state_dict`` of it continues the identical sequence."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self._step,
            "batch": self._batch,
            "slot": self._slot,
            "probs": dict(self.probs),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore counters (and the realised-mixture counts) from ``state_dict()``.

        With ``strict`` the seed, rank, world size and effective mixture must match this sampler's, since the
        sequence is only identical under them. ``strict=False`` restores the counters anyway (e.g. a recipe
        changed its mixture mid-run); counts of sources no longer in the mixture are dropped.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"MixtureSampler state version must be {STATE_VERSION}, got {state.get('version')!r}"
            )
        if strict:
            mine = self.state_dict()
            for name in ("seed", "rank", "world_size"):
                if state[name] != mine[name]:
                    raise ValueError(
                        f"MixtureSampler state {name} is {state[name]!r}, this sampler has {mine[name]!r}"
                    )
            if list(state["probs"].items()) != list(self.probs.items()):
                raise ValueError(
                    f"MixtureSampler state mixture {state['probs']} differs from this sampler's {self.probs}"
                )
        self._step = _check_int("step", state["step"], 0)
        self._batch = _check_int("batch", state["batch"], 0)
        self._slot = _check_int("slot", state["slot"], 0)
        self._counts = {s: int(state["counts"].get(s, 0)) for s in self.probs}

    # -- realised-mixture accounting

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def realised(self) -> dict[str, float]:
        """Fraction of draws so far per source (all 0 before the first draw)."""
        total = self.total
        return {s: (c / total if total else 0.0) for s, c in self._counts.items()}

    def reset_counts(self) -> None:
        """Zero the accounting (e.g. per logging interval); the stream itself is unaffected."""
        self._counts = dict.fromkeys(self.probs, 0)

    def report(self) -> dict[str, Any]:
        """Target vs realised per source, for logging.

        ``z`` is the realised fraction's deviation in binomial standard deviations,
        (realised - target) / sqrt(target * (1 - target) / total); |z| beyond ~4 under ``next()`` is a bug.
        """
        total = self.total
        realised = self.realised()
        sources: dict[str, dict[str, float]] = {}
        for source, target in self.probs.items():
            sd = math.sqrt(target * (1 - target) / total) if total and 0 < target < 1 else 0.0
            sources[source] = {
                "target": target,
                "realised": realised[source],
                "count": self._counts[source],
                "z": (realised[source] - target) / sd if sd else 0.0,
            }
        return {"total": total, "sources": sources}

    def format_report(self) -> str:
        """``report()`` as a fixed-width table."""
        rep = self.report()
        width = max(len(s) for s in rep["sources"])
        lines = [f"{'source':<{width}}  target%  realised%    count      z  (n={rep['total']})"]
        for source, row in rep["sources"].items():
            lines.append(
                f"{source:<{width}}  {100 * row['target']:7.2f}  {100 * row['realised']:9.2f}"
                f"  {row['count']:7d}  {row['z']:+5.2f}"
            )
        return "\n".join(lines)
