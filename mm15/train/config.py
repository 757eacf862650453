"""Training recipes as typed, validated data: a model preset and an ordered list of stages.

A recipe (``RecipeConfig``) names a model preset and lists its training stages (``StageConfig``) in order;
each stage says where it starts from (``parent``), what it trains (``trainable``), how (``optimizer``,
``schedule``, batch sizes) and on what (``data``: a mixture of named sources, ``image``: overrides of the
preset's image plan). MM1.5's recipe is three stages: pre-training, high-resolution continual
pre-training on OCR data and SFT (mm15-spec.md section 3); ``recipes/*.yaml`` holds it at several sizes.

``load_recipe(path)`` reads YAML (PyYAML's safe loader, refusing a key repeated in one mapping) and
validates everything it can before any model or data is touched (design principle 3): unknown keys,
types, ranges, stage order, mixture weights and sources, batch-size arithmetic, image-plan overrides
against the preset. Every error is a ``ValueError`` naming the field by its path, e.g.
``recipe.stages[1].optimizer.lr: must be > 0, got -1``. What cannot be known at load time is checked
by ``mm15.train.run.run_recipe`` before the first stage trains: the world size
(``StageConfig.grad_accum``) and that data paths exist; a parent checkpoint directory when its stage
starts (paths are only checked for syntax here, so the GPU recipes load on any machine).

Sources. A mixture leaf is resolved to a data source by ``DataConfig.resolve_sources``:

* an entry of ``data.sources``: ``"synth:<generator or category>"`` (the synthetic engine,
  ``mm15.data.synth``) or ``"<format>:<path>"`` with format ``shards`` (WebDataset tar shards) or
  ``video`` (video-QA annotations, ``mm15.data.video_qa``). LLaVA, interleaved and text files are packed
  into shards first (``mm15 data pack``); naming them here is an error that says so;
* otherwise a leaf named ``synth/<generator>`` is that generator, and a leaf named after a category that
  has synthetic generators (``text-rich``, ``general``, ...) is all of that category's generators.

Anything else is an unknown source, so a typo cannot silently turn into another data set.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mm15.data.mixture import MixtureNode, effective_weights
from mm15.geometry import ImagePlanConfig
from mm15.paths import not_a_file_reason

ROOT = "recipe"

MODULES: tuple[str, ...] = ("encoder", "connector", "llm", "routers")
# A stage's trainable modules when the recipe does not say: all of them (routers only where there is MoE).
DEFAULT_TRAINABLE: tuple[str, ...] = MODULES
OptimizerName = Literal["adamw", "adafactor"]
Autocast = Literal["auto", "bf16", "fp32"]
NanPolicy = Literal["skip", "error"]
DISTRIBUTED_STRATEGIES: tuple[str, ...] = ("auto", "none", "ddp", "fsdp2")
OverBudget = Literal["drop", "error"]
Sampling = Literal["random", "balanced"]
Prefetch = Literal["auto", "inline", "thread", "process"]

# Source formats that read files; "synth" is the generator engine and takes no path.
PATH_FORMATS: tuple[str, ...] = ("shards", "video")
# Raw formats that training reads only once packed into shards (``mm15 data pack``): packing checks every
# record and image header once, instead of on every pass of every run.
PACK_FIRST_FORMATS: tuple[str, ...] = ("llava", "interleaved", "text")
SYNTH = "synth"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class _FieldError(ValueError):
    """A validation error of one field, relative to the object being built; ``_build`` adds the path."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


# ----------------------------------------------------------------------------------- value parsers
# Each parser takes (path, value) and returns the typed value or raises ValueError naming the path. They
# are strict: YAML turns "1e-3" into a string and "yes" into a bool, and both should fail loudly.


def _type_error(path: str, expected: str, value: Any, hint: str = "") -> ValueError:
    return ValueError(f"{path}: must be {expected}, got {value!r} ({type(value).__name__}){hint}")


# A number in exponent form that YAML 1.1 (PyYAML) reads as a string: its floats need a dot and a signed
# exponent, so "1e-3", "5e4" and "1.0e3" are strings while "1.0e-3" is a float.
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _exponent_hint(value: Any, integer: bool) -> str:
    """Why a numeric field got a string, when YAML's reading of exponent notation can be the cause."""
    if not (isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip())):
        return ""
    if integer:
        return f" (YAML reads {value} as a string: write the integer in full, e.g. 1000 for 1e3)"
    return f" (YAML reads {value} as a string: write it with a dot and a signed exponent, e.g. 1.0e-3)"


def _int(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(path, "an integer", value, _exponent_hint(value, integer=True))
    return value


def _int64(path: str, value: Any) -> int:
    # torch, NumPy and the data streams take a seed as a 64-bit integer: a larger one passed --check and
    # then stopped the run at its first draw ("Overflow when unpacking long long").
    number = _int(path, value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise ValueError(f"{path}: must fit in a 64-bit signed integer [-2**63, 2**63 - 1], got {number}")
    return number


def _float(path: str, value: Any) -> float:
    # bool is an int subclass; "lr: true" is a mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(path, "a number", value, _exponent_hint(value, integer=False))
    if not math.isfinite(value):
        raise ValueError(f"{path}: must be finite, got {value}")
    return float(value)


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(path, "true or false", value)
    return value


def _str(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _type_error(path, "a non-empty string", value)
    return value


def _opt(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda path, value: None if value is None else parse(path, value)


def _choice(*allowed: str) -> Callable[[str, Any], str]:
    def parse(path: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"{path}: must be one of {list(allowed)}, got {value!r}")
        return value

    return parse


def _list_of(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], tuple[Any, ...]]:
    def parse_list(path: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _type_error(path, "a list", value)
        return tuple(parse(f"{path}[{i}]", v) for i, v in enumerate(value))

    return parse_list


def _map_of(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], dict[str, Any]]:
    def parse_map(path: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _type_error(path, "a mapping", value)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{path}: keys must be non-empty strings, got {key!r}")
            out[key] = parse(f"{path}.{key}", item)
        return out

    return parse_map


def _parser_for_type(hint: Any) -> Callable[[str, Any], Any]:
    """The strict parser of a dataclass field's type: ``int``, ``float``, ``bool``, ``str``, a
    ``Literal`` of strings, ``tuple[X, ...]`` (a YAML list) or any of those ``| None``. Another type is a
    ``TypeError``: a field that ``model.overrides`` cannot check yet must not pass unchecked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        if len(rest) == 1:
            return _opt(_parser_for_type(rest[0]))
    elif origin is Literal and all(isinstance(a, str) for a in args):
        return _choice(*args)
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _list_of(_parser_for_type(args[0]))
    elif hint in _SCALAR_PARSERS:
        return _SCALAR_PARSERS[hint]
    raise TypeError(f"no recipe parser for the field type {hint!r}")


_SCALAR_PARSERS: dict[Any, Callable[[str, Any], Any]] = {bool: _bool, int: _int, float: _float, str: _str}


def _plain_mapping(path: str, value: Any) -> dict[str, Any]:
    """A nested mapping kept as plain data (mixtures, model overrides); validated by its owner."""
    if not isinstance(value, Mapping):
        raise _type_error(path, "a mapping", value)
    return {k: _plain_mapping(f"{path}.{k}", v) if isinstance(v, Mapping) else v for k, v in value.items()}


def _nested(cls: type) -> Callable[[str, Any], Any]:
    """A parser for a nested config: ``cls.from_dict(value, path)``."""
    return lambda path, value: cls.from_dict(value, path)


def _build(cls: type, path: str, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except _FieldError as err:
        raise ValueError(f"{path}.{err.field_path}: {err.message}") from None


def _read(cls: type, path: str, data: Any, parsers: Mapping[str, Callable[[str, Any], Any]]) -> Any:
    """Build dataclass ``cls`` from mapping ``data``: unknown keys and missing required fields are errors."""
    if not isinstance(data, Mapping):
        raise _type_error(path, "a mapping", data)
    for key in data:
        if key not in parsers:
            raise ValueError(f"{path}.{key}: unknown key (allowed: {', '.join(parsers)})")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ValueError(f"{path}.{f.name}: required")
    return _build(cls, path, {k: parsers[k](f"{path}.{k}", v) for k, v in data.items()})


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and dicts as YAML-ready plain data (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check(ok: bool, field_path: str, message: str) -> None:
    if not ok:
        raise _FieldError(field_path, message)


def _check_choice(field_path: str, value: Any, allowed: tuple[str, ...], what: str = "value") -> None:
    _check(value in allowed, field_path, f"unknown {what} {value!r} (one of {list(allowed)})")


def _check_modules(field_path: str, names: Any) -> None:
    for name in names:
        _check(name in MODULES, field_path, f"unknown module {name!r} (one of {list(MODULES)})")


def _looks_like_path(text: str) -> bool:
    # A checkpoint directory is told apart from a (mistyped) stage name by its shape only; whether it exists
    # is checked when the stage starts, so recipes stay loadable on machines without the checkpoints.
    return "/" in text or "\\" in text or text.startswith((".", "~"))


# ------------------------------------------------------------------------------------------ optimizer


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its per-module learning rates.

    ``lr`` is the peak learning rate. A module's rate is ``module_lr[m]`` if given, else
    ``lr * lr_scale.get(m, 1)``; naming a module in both is an error. ``weight_decay`` is torch's coupled
    form (per-step decay = lr * weight_decay), so MM1's lambda = 0.1 * eta is ``weight_decay: 0.1``.
    ``betas`` and ``eps`` are AdamW's; AdaFactor uses its own defaults for its second-moment decay.
    """

    name: OptimizerName = "adamw"
    lr: float = 1e-4
    lr_scale: dict[str, float] = field(default_factory=dict)
    module_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_choice("name", self.name, ("adamw", "adafactor"))
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        for key, table in (("lr_scale", self.lr_scale), ("module_lr", self.module_lr)):
            _check_modules(key, table)
            for module, value in table.items():
                _check(value >= 0, f"{key}.{module}", f"must be >= 0, got {value}")
        both = sorted(set(self.lr_scale) & set(self.module_lr))
        _check(not both, "module_lr", f"modules {both} also have an lr_scale; give one or the other")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2, "betas", f"must be two numbers, got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            _check(0 <= beta < 1, f"betas[{i}]", f"must be in [0, 1), got {beta}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")

    def lr_for(self, module: str) -> float:
        """Peak learning rate of ``module`` (one of ``MODULES``)."""
        if module not in MODULES:
            raise ValueError(f"unknown module {module!r} (one of {list(MODULES)})")
        if module in self.module_lr:
            return self.module_lr[module]
        return self.lr * self.lr_scale.get(module, 1.0)

    @classmethod
    def from_dict(cls, data: Any, path: str = "optimizer") -> OptimizerConfig:
        return _read(
            cls,
            path,
            data,
            {
                "name": _choice("adamw", "adafactor"),
                "lr": _float,
                "lr_scale": _map_of(_float),
                "module_lr": _map_of(_float),
                "weight_decay": _float,
                "betas": _list_of(_float),
                "eps": _float,
            },
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` of the peak (MM1: 10%).

    ``total_steps`` is the 0-based step at which the cosine reaches its floor (and stays there); ``None``
    means the stage's ``max_steps``, so an uncut stage's last step is just above the floor. ``0`` (with no
    warm-up) is the floor from the first step; ``mm15 train --max-steps`` uses it for a one-step cut
    (``compressed``).
    """

    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    total_steps: int | None = None

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.total_steps is not None:
            _check(self.total_steps >= 0, "total_steps", f"must be >= 0, got {self.total_steps}")
            _check(
                self.warmup_steps <= self.total_steps,
                "warmup_steps",
                f"({self.warmup_steps}) must be <= total_steps ({self.total_steps})",
            )

    def factor(self, step: int, max_steps: int) -> float:
        """The multiplier of the peak LR at optimizer step ``step`` (0-based)."""
        total = max_steps if self.total_steps is None else self.total_steps
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= total:
            # The floor from ``total`` on, also for a cosine of no length (total == warm-up): the last step
            # of a stage cut by --max-steps to its warm-up plus one step is at the floor, not the peak.
            # For total > warm-up this is what the cosine gives at progress 1 (cos(pi) is exactly -1).
            return self.min_lr_ratio
        progress = (step - self.warmup_steps) / (total - self.warmup_steps)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def compressed(self, stage_steps: int, steps: int) -> ScheduleConfig:
        """This schedule of a ``stage_steps``-step stage squeezed into its first ``steps`` (``--max-steps``).

        The warm-up keeps its share of the stage: ``warmup_steps * steps / stage_steps`` rounded half up,
        at most ``steps - 1``; the cosine then reaches its floor on step ``steps - 1``, the last one that
        runs (``total_steps = steps - 1``; the recipe's own ``total_steps`` is dropped), so a cut stage
        ends at ``min_lr_ratio`` as the full stage would. A one-step stage runs that step at the floor.
        """
        if not 1 <= steps < stage_steps:
            raise ValueError(f"a cut needs 1 <= steps < stage_steps, got {steps} and {stage_steps}")
        warmup = (2 * self.warmup_steps * steps + stage_steps) // (2 * stage_steps)  # exact, halves up
        return dataclasses.replace(self, warmup_steps=min(warmup, steps - 1), total_steps=steps - 1)

    @classmethod
    def from_dict(cls, data: Any, path: str = "schedule") -> ScheduleConfig:
        return _read(
            cls,
            path,
            data,
            {"warmup_steps": _int, "min_lr_ratio": _float, "total_steps": _opt(_int)},
        )


# ----------------------------------------------------------------------------------------------- data


def _synth_targets() -> tuple[set[str], set[str]]:
    """Generator names, and the categories that have at least one generator."""
    from mm15.data.synth import generators  # imports the generator modules; only needed to validate

    registry = generators()
    return set(registry), {g.category for g in registry.values()}


def _check_source_spec(field_path: str, spec: str) -> None:
    kind, sep, target = spec.partition(":")
    _check(
        kind not in PACK_FIRST_FORMATS,
        field_path,
        f"{kind!r} files are trained on as shards: pack them first (mm15 data pack FILE --format {kind} "
        f"--images DIR --out SHARDS, see docs/data.md) and give 'shards:SHARDS'; got {spec!r}",
    )
    formats = [SYNTH, *PATH_FORMATS]
    _check(
        bool(sep) and kind in formats and bool(target.strip()),
        field_path,
        f"must be '<format>:<target>' with format one of {formats}, got {spec!r}",
    )
    if kind == "shards":
        # A shard source is a folder of .tar shards or one .tar shard, and the reader takes any file it is
        # given for a tar: a raw JSON/JSONL file passed --check and then stopped the first read with
        # "corrupt tar stream". Only an existing file is judged: paths may not exist where a recipe is
        # checked, and a missing one is reported when the stage's sources are opened.
        _check(
            not os.path.isfile(target) or target.lower().endswith(".tar"),
            field_path,
            f"{target!r} is a file but not a .tar shard: a shard source is a folder of shards or one .tar "
            f"shard. LLaVA, interleaved and text JSON/JSONL files are trained on as shards: pack them first "
            f"(mm15 data pack FILE --format llava|interleaved|text --images DIR --out SHARDS, see "
            f"docs/data.md) and give 'shards:SHARDS'; got {spec!r}",
        )
    if kind == SYNTH:
        names, categories = _synth_targets()
        _check(
            target in names or target in categories,
            field_path,
            f"unknown synthetic generator or category {target!r} "
            f"(generators: {sorted(names)}; categories: {sorted(categories)})",
        )


@dataclass(frozen=True)
class DataConfig:
    """What a stage trains on.

    ``mixture`` is the nested mapping ``MixtureNode.from_dict`` reads; ``sources`` maps leaf names to
    source specs (module docstring). ``seq_length`` is the packed sequence length in tokens. Samples longer
    than it are never truncated (an image span cut in half is a silent corruption): ``over_budget: drop``
    skips and counts them, ``error`` stops. ``sampling: balanced`` draws every source equally in each batch
    (MM1.5's OCR stage; needs equal effective weights), ``random`` draws i.i.d. from the mixture.
    ``prefetch: process`` prepares the next micro-batches in a worker process while the model trains,
    ``thread`` on a background thread, ``inline`` each one when the step asks for it. On a 2-core CPU
    the worker trains as fast as ``inline`` with the step hardly waiting for data, and the thread is
    slowest (docs/training.md has the measurements). ``auto`` (the default) is ``process`` on Linux,
    else ``inline``. ``shuffle_buffer``: shard sources are read in a new shard order on every pass and
    through a buffer of this many samples that emits a random one as each new one arrives (seeded by the
    recipe's seed and the pass, so a resumed run sees the same order); 0 reads them in file order. The
    buffer holds encoded samples (images as file bytes), so its memory is about that many samples'
    size. Synthetic and video sources are unaffected: they are already random draws.
    """

    mixture: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    seq_length: int = 4096
    packing: bool = True
    over_budget: OverBudget = "drop"
    sampling: Sampling = "random"
    prefetch: Prefetch = "auto"
    shuffle_buffer: int = 256

    def __post_init__(self) -> None:
        _check(self.seq_length >= 1, "seq_length", f"must be >= 1, got {self.seq_length}")
        _check(self.shuffle_buffer >= 0, "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}")
        _check_choice("over_budget", self.over_budget, ("drop", "error"))
        _check_choice("sampling", self.sampling, ("random", "balanced"))
        _check_choice("prefetch", self.prefetch, ("auto", "inline", "thread", "process"))
        for name, spec in self.sources.items():
            _check(isinstance(spec, str), f"sources.{name}", f"must be a string, got {spec!r}")
            _check_source_spec(f"sources.{name}", spec)
        try:
            node = MixtureNode.from_dict(self.mixture, available=self._available())
        except ValueError as err:
            # MixtureNode errors read "mixture.a.b: message"; keep that path under this config's path.
            where, _, message = str(err).partition(": ")
            raise _FieldError(where, message) from None
        leaves = {leaf.name for _, leaf, _ in node.leaves()}
        unused = sorted(set(self.sources) - leaves)
        # An unused source is almost always a misspelt leaf (which then failed above or went elsewhere).
        _check(not unused, f"sources.{unused[0]}" if unused else "sources", "not used by the mixture")
        if self.sampling == "balanced":
            probs = list(effective_weights(node).values())
            _check(
                max(probs) - min(probs) <= 1e-9 * max(probs),
                "sampling",
                "'balanced' needs equal effective weights for all sources",
            )

    def _available(self) -> set[str]:
        names, categories = _synth_targets()
        return set(self.sources) | {f"{SYNTH}/{n}" for n in names} | categories

    def mixture_node(self) -> MixtureNode:
        """The mixture as a ``MixtureNode`` (root named ``mixture``)."""
        return MixtureNode.from_dict(self.mixture)

    def resolve_sources(self) -> dict[str, str]:
        """Every mixture leaf's source spec (``synth:<...>`` or ``<format>:<path>``), in tree order."""
        out: dict[str, str] = {}
        for _, leaf, _ in self.mixture_node().leaves():
            name = leaf.name
            if name in self.sources:
                out[name] = self.sources[name]
            elif name.startswith(f"{SYNTH}/"):
                out[name] = f"{SYNTH}:{name[len(SYNTH) + 1 :]}"
            else:
                out[name] = f"{SYNTH}:{name}"
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = "data") -> DataConfig:
        return _read(
            cls,
            path,
            data,
            {
                "mixture": _plain_mapping,
                "sources": _map_of(_str),
                "seq_length": _int,
                "packing": _bool,
                "over_budget": _choice("drop", "error"),
                "sampling": _choice("random", "balanced"),
                "prefetch": _choice("auto", "inline", "thread", "process"),
                "shuffle_buffer": _int,
            },
        )


@dataclass(frozen=True)
class ImageConfig:
    """Overrides of the preset's ``ImagePlanConfig`` for one stage; ``None`` keeps the preset's value.

    ``tile_size`` must stay the encoder's input size (the model checks it when built, and so does
    ``RecipeConfig`` at load time); a stage gets more pixels per image by splitting into more tiles.
    """

    tile_size: int | None = None
    n_min: int | None = None
    n_max: int | None = None
    split: bool | None = None
    overview: Literal["after", "before", "none"] | None = None
    indicator: Literal["none", "index", "separators"] | None = None
    max_images_to_split: int | None = None

    def apply(self, base: ImagePlanConfig) -> ImagePlanConfig:
        """``base`` with these overrides (validated by ``ImagePlanConfig``)."""
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, data: Any, path: str = "image") -> ImageConfig:
        return _read(
            cls,
            path,
            data,
            {
                "tile_size": _opt(_int),
                "n_min": _opt(_int),
                "n_max": _opt(_int),
                "split": _opt(_bool),
                "overview": _opt(_choice("after", "before", "none")),
                "indicator": _opt(_choice("none", "index", "separators")),
                "max_images_to_split": _opt(_int),
            },
        )


# ---------------------------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class StageConfig:
    """One training stage.

    ``parent``: ``"init"`` (the preset's weights; first stage only), the name of an earlier stage, or a
    checkpoint directory (a path; existence is checked when the stage starts). ``trainable`` lists the
    modules that get gradients; ``routers`` are the MoE routers (absent in dense models). ``global_batch``
    is samples per optimizer step = ``micro_batch * grad_accum * world_size``. ``eval_every`` = 0 turns
    evaluation off; otherwise every ``eval_every`` steps (and at the stage's end) the model is evaluated
    on ``eval_tasks`` (``mm15 eval`` task specs: tasks or categories) with ``eval_limit`` items each.
    ``loss_weighting``: what the loss averages over, ``token`` (every supervised token, MM1.5), ``sample``
    (every sample equally) or ``sqrt`` (mm15.train.trainer.token_weights). ``nan_policy``: ``skip``
    drops a step whose loss or gradient is not finite (counted), ``error`` stops.
    ``max_corrupt_fraction``: the run stops once more than this fraction of samples were skipped as
    corrupt (principle 2: skips are counted, never unbounded).
    """

    name: str
    data: DataConfig
    parent: str = "init"
    trainable: tuple[str, ...] = DEFAULT_TRAINABLE
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    global_batch: int = 256
    micro_batch: int = 1
    max_steps: int = 1000
    eval_every: int = 0
    eval_tasks: str = "general,text-rich,knowledge,refer-ground,multi-image,in-context"
    eval_limit: int = 8
    save_every: int = 1000
    keep_last: int = 2
    autocast: Autocast = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    max_grad_norm: float = 1.0
    loss_weighting: str = "token"
    nan_policy: NanPolicy = "error"
    max_corrupt_fraction: float = 0.01
    image: ImageConfig = field(default_factory=ImageConfig)

    def __post_init__(self) -> None:
        # The name is a folder of the run directory: "." or ".." would put the stage's files elsewhere.
        ok_name = bool(self.name) and "/" not in self.name and self.name not in (".", "..")
        _check(
            ok_name, "name", f"must be a non-empty name without '/', and not '.' or '..', got {self.name!r}"
        )
        _check(bool(self.parent), "parent", "must be non-empty")
        _check(bool(self.trainable), "trainable", "must name at least one module")
        _check_modules("trainable", self.trainable)
        zero = [m for m in self.trainable if self.optimizer.lr_for(m) == 0]
        _check(
            len(zero) < len(self.trainable),
            "optimizer.lr_scale",
            f"gives every trainable module ({zero}) a learning rate of 0: the stage would train nothing",
        )
        dupes = sorted({m for m in self.trainable if self.trainable.count(m) > 1})
        _check(not dupes, "trainable", f"lists {dupes} twice")
        for key in ("global_batch", "micro_batch", "max_steps", "save_every", "keep_last"):
            value = getattr(self, key)
            _check(value >= 1, key, f"must be >= 1, got {value}")
        _check(self.eval_every >= 0, "eval_every", f"must be >= 0 (0 = off), got {self.eval_every}")
        _check(self.eval_limit >= 1, "eval_limit", f"must be >= 1, got {self.eval_limit}")
        if self.eval_every:
            from mm15.eval.tasks import TaskError, resolve_task_specs

            try:
                resolve_task_specs(self.eval_tasks, check_files=False)  # syntax: files are checked at start
            except TaskError as err:
                raise _FieldError("eval_tasks", str(err)) from None
        _check(
            self.global_batch % self.micro_batch == 0,
            "global_batch",
            f"({self.global_batch}) must be a multiple of micro_batch ({self.micro_batch})",
        )
        _check_choice("autocast", self.autocast, ("auto", "bf16", "fp32"))
        _check(self.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _check_choice("nan_policy", self.nan_policy, ("skip", "error"))
        _check_choice("loss_weighting", self.loss_weighting, ("token", "sample", "sqrt"))
        _check(
            0 <= self.max_corrupt_fraction <= 1,
            "max_corrupt_fraction",
            f"must be in [0, 1], got {self.max_corrupt_fraction}",
        )
        total = self.max_steps if self.schedule.total_steps is None else self.schedule.total_steps
        _check(
            self.schedule.warmup_steps <= total,
            "schedule.warmup_steps",
            f"({self.schedule.warmup_steps}) must be <= the schedule's total steps ({total})",
        )

    def grad_accum(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each rank; raises unless ``global_batch`` divides evenly."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"stage {self.name!r}: global_batch ({self.global_batch}) must be a multiple of "
                f"micro_batch * world_size ({self.micro_batch} * {world_size} = {per_step})"
            )
        return self.global_batch // per_step

    @classmethod
    def from_dict(cls, data: Any, path: str = "stage") -> StageConfig:
        return _read(
            cls,
            path,
            data,
            {
                "name": _str,
                "parent": _str,
                "trainable": _list_of(_str),
                "optimizer": _nested(OptimizerConfig),
                "schedule": _nested(ScheduleConfig),
                "global_batch": _int,
                "micro_batch": _int,
                "max_steps": _int,
                "eval_every": _int,
                "eval_tasks": _str,
                "eval_limit": _int,
                "save_every": _int,
                "keep_last": _int,
                "autocast": _choice("auto", "bf16", "fp32"),
                "compile": _bool,
                "grad_checkpointing": _bool,
                "max_grad_norm": _float,
                "loss_weighting": _choice("token", "sample", "sqrt"),
                "nan_policy": _choice("skip", "error"),
                "max_corrupt_fraction": _float,
                "data": _nested(DataConfig),
                "image": _nested(ImageConfig),
            },
        )


# --------------------------------------------------------------------------------------------- recipe

# Sections of MM15Config that ``model.overrides`` may change, field by field.
_OVERRIDE_SECTIONS: tuple[str, ...] = ("vision", "connector", "llm", "moe", "image")


@dataclass(frozen=True)
class ModelSpec:
    """The model: a preset name (``mm15.model.presets``), its local weight paths, and field overrides.

    ``overrides`` is ``{section: {field: value}}`` for sections vision, connector, llm, moe and image of
    ``MM15Config``, e.g. ``{"llm": {"num_layers": 2}}``. ``moe`` also turns a dense preset into a
    mixture of experts (MM1.5's ``MoEConfig`` with the given fields changed; ``{}`` for all of MM1.5's
    settings), and ``moe: null`` makes a MoE preset dense.
    """

    preset: str
    vision_path: str | None = None
    llm_path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mm15.model.mm15 import config_problems

        # The parts' sizes must fit each other: a mismatch found here names the recipe, not the first
        # step of a run (or, with --check, passes for a recipe that cannot train).
        problems = config_problems(self.build())
        if problems:
            where = "overrides" if self.overrides else "preset"
            raise _FieldError(where, "; ".join(problems))

    def build(self) -> Any:
        """The ``MM15Config`` this describes (no weights are loaded)."""
        from mm15.model.presets import PRESETS, preset

        _check(self.preset in PRESETS, "preset", f"unknown preset {self.preset!r} (one of {sorted(PRESETS)})")
        paths = {k: v for k, v in (("vision_path", self.vision_path), ("llm_path", self.llm_path)) if v}
        if paths and self.preset in ("tiny", "smol"):
            raise _FieldError(next(iter(paths)), f"preset {self.preset!r} takes no weight paths")
        cfg = preset(self.preset, **paths)
        changes = {}
        for section, values in self.overrides.items():
            _check_choice(f"overrides.{section}", section, _OVERRIDE_SECTIONS, what="section")
            if section == "moe" and values is None:  # moe: null makes a MoE preset dense
                changes["moe"] = None
                continue
            _check(isinstance(values, Mapping), f"overrides.{section}", f"must be a mapping, got {values!r}")
            current = getattr(cfg, section)
            if section == "moe" and current is None:
                # A dense preset gets MoE layers: MM1.5's settings (MoEConfig) with these fields changed.
                from mm15.model.moe import MoEConfig

                current = MoEConfig()
            _check(current is not None, f"overrides.{section}", f"preset {self.preset!r} has no {section}")
            known = {f.name for f in dataclasses.fields(current)}
            hints = typing.get_type_hints(type(current))
            parsed = {}
            for key, value in values.items():
                where = f"overrides.{section}.{key}"
                _check(key in known, where, f"unknown field (one of {sorted(known)})")
                # Each value as the field's type, as strictly as the rest of the recipe: YAML's "false" is
                # a string (truthy), and a wrong type would otherwise pass until the model is built.
                try:
                    parsed[key] = _parser_for_type(hints[key])(where, value)
                except ValueError as err:
                    raise _FieldError(where, str(err).removeprefix(f"{where}: ")) from None
            try:
                changes[section] = dataclasses.replace(current, **parsed)
            except (ValueError, TypeError) as err:
                raise _FieldError(f"overrides.{section}", str(err)) from None
        return dataclasses.replace(cfg, **changes)

    @classmethod
    def from_dict(cls, data: Any, path: str = "model") -> ModelSpec:
        return _read(
            cls,
            path,
            data,
            {"preset": _str, "vision_path": _opt(_str), "llm_path": _opt(_str), "overrides": _plain_mapping},
        )


def _marker_token_count(cfg: Any) -> Callable[[str], int] | None:
    """What a tile marker costs where the model's tokenizer is known without loading anything: the tiny
    decoder's byte tokenizer has one token per UTF-8 byte and no merges. ``None`` (other tokenizers, which
    may be files on another machine) counts ``mm15.geometry.marker_token_floor``, a lower bound."""
    if cfg.llm.source == "tiny" and cfg.llm.tokenizer == "bytes":
        return lambda marker: len(marker.encode("utf-8"))
    return None


def _encoder_input_size(cfg: Any) -> int | None:
    vision = cfg.vision
    return vision.input_size or vision.image_size


@dataclass(frozen=True)
class RecipeConfig:
    """A model and its ordered training stages (unique names; parents only point backwards).

    ``output_dir`` holds one sub-directory per stage; ``None`` means ``runs/<name>``. ``distributed`` is
    the data-parallel strategy under ``torchrun``: ``ddp``, ``fsdp2``, ``none`` or ``auto`` (DDP when
    there are several ranks); ``mm15 train --strategy`` overrides it.
    """

    name: str
    model: ModelSpec
    stages: tuple[StageConfig, ...]
    seed: int = 0
    output_dir: str | None = None
    distributed: str = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must be non-empty")
        _check(bool(self.stages), "stages", "must list at least one stage")
        _check_choice("distributed", self.distributed, DISTRIBUTED_STRATEGIES)
        seen: list[str] = []
        from_spec: dict[str, bool] = {}  # stage -> whether its model is the recipe's model spec
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            _check(stage.name not in seen, f"{where}.name", f"duplicate stage name {stage.name!r}")
            parent = stage.parent
            if parent == "init":
                _check(i == 0, f"{where}.parent", "'init' is only for the first stage; name an earlier stage")
            elif parent == stage.name:
                raise _FieldError(f"{where}.parent", f"stage {stage.name!r} cannot be its own parent")
            elif parent in names and parent not in seen:
                raise _FieldError(f"{where}.parent", f"{parent!r} is a later stage (parents come first)")
            elif parent not in seen:
                _check(
                    _looks_like_path(parent),
                    f"{where}.parent",
                    f"{parent!r} is neither 'init', an earlier stage ({seen}) nor a checkpoint path",
                )
            seen.append(stage.name)
            self._check_image(i, stage)
            # A stage that starts from a model directory trains whatever that model is (it may have MoE).
            from_spec[stage.name] = parent == "init" or from_spec.get(parent, False)
            # The default (every module there is) names routers for MoE models; a dense model has none.
            named = "routers" in stage.trainable and stage.trainable != DEFAULT_TRAINABLE
            if from_spec[stage.name] and named and self.model.build().moe is None:
                alone = set(stage.trainable) == {"routers"}
                raise _FieldError(
                    f"{where}.trainable",
                    ("only 'routers', but" if alone else "names 'routers', but")
                    + " the model has no mixture-of-experts layers"
                    + (" (so nothing would train)" if alone else ""),
                )

    def _check_image(self, index: int, stage: StageConfig) -> None:
        where = f"stages[{index}].image"
        base = self.model.build()
        try:
            plan = stage.image.apply(base.image)
        except ValueError as err:
            raise _FieldError(where, str(err)) from None
        encoder = _encoder_input_size(base)
        _check(
            encoder is None or plan.tile_size == encoder,
            f"{where}.tile_size",
            f"{plan.tile_size} is not the encoder's input size {encoder} (change the encoder with "
            "model.overrides.vision.input_size and connector.num_patches instead)",
        )
        # A sequence that cannot hold any image would train only the text-only samples while the
        # others are skipped as too long, and that is a typo, not a plan. An image span is its image
        # tokens and the tile markers before them ("(k, i, j)" is 9 byte tokens): without the markers
        # three unsplit 16-token images "fit" 64 tokens, and every such sample was then dropped.
        if base.llm.source == "tiny":  # a random decoder's context is the recipe's own setting
            context = base.llm.max_position_embeddings
            _check(
                stage.data.seq_length <= context,
                f"stages[{index}].data.seq_length",
                f"{stage.data.seq_length} is longer than the decoder's context ({context} positions, "
                "model.llm.max_position_embeddings)",
            )
        least = plan.min_image_span_tokens(_marker_token_count(base))
        _check(
            stage.data.seq_length >= least or _text_only(stage.data.resolve_sources().values()),
            f"stages[{index}].data.seq_length",
            f"{stage.data.seq_length} tokens cannot hold a sample with an image under this stage's "
            f"image plan (at least {least} tokens: {plan.min_image_tokens_per_sample()} image tokens and "
            "their tile markers)",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def stage(self, name: str) -> StageConfig:
        for stage in self.stages:
            if stage.name == name:
                return stage
        names = [s.name for s in self.stages]
        raise ValueError(f"recipe {self.name!r} has no stage {name!r} (stages: {names})")

    def image_plan(self, stage: str) -> ImagePlanConfig:
        """The preset's image plan with ``stage``'s overrides."""
        return self.stage(stage).image.apply(self.model.build().image)

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` reads back to an equal config (and ``yaml.safe_dump`` writes)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Any, path: str = ROOT) -> RecipeConfig:
        def stages(p: str, value: Any) -> tuple[StageConfig, ...]:
            if not isinstance(value, list):
                raise _type_error(p, "a list of stages", value)
            out = []
            for i, item in enumerate(value):
                if isinstance(item, Mapping) and "parent" not in item:
                    # Default parent: the previous stage, so a linear recipe need not repeat the chain.
                    item = {**item, "parent": out[-1].name if out else "init"}
                out.append(StageConfig.from_dict(item, f"{p}[{i}]"))
            return tuple(out)

        return _read(
            cls,
            path,
            data,
            {
                "name": _str,
                "model": _nested(ModelSpec),
                "stages": stages,
                "seed": _int64,
                "output_dir": _opt(_str),
                "distributed": _choice(*DISTRIBUTED_STRATEGIES),
            },
        )


def _text_only(specs: Iterable[str]) -> bool:
    """Whether every source spec is a synthetic generator of text alone (their samples hold no image)."""
    from mm15.data.synth import synth_names

    text = set(synth_names("text-only"))
    return all(
        spec.startswith(f"{SYNTH}:") and set(synth_names(spec[len(SYNTH) + 1 :])) <= text for spec in specs
    )


def load_recipe(path: str | Path) -> RecipeConfig:
    """Read and validate a YAML recipe; errors name the field path (``recipe.stages[1].optimizer.lr``)."""
    file = Path(path)
    if (problem := not_a_file_reason(file)) is not None:
        raise FileNotFoundError(f"recipe {file}: {problem}")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        # PyYAML composes nested collections recursively: a few hundred levels exhaust Python's stack.
        raise ValueError(f"{path}: not valid YAML (nested too deeply)") from None
    try:
        return RecipeConfig.from_dict(data)
    except RecursionError:
        # The recipe's own reading of nested mappings (mixtures, overrides) is recursive as well.
        raise ValueError(f"{path}: not a valid recipe (nested too deeply)") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping.

    YAML says keys are unique, but PyYAML keeps the last one: a repeated ``caption:`` in a mixture, or a
    second ``lr:``, would silently replace the first (50:10:40 became 9:18:73 with one stray line).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": merged keys may be overridden by the mapping's own ones
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if isinstance(key, Hashable) and key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    f"while reading a mapping (first {key!r} on line {first})",
                    node.start_mark,
                    f"key {key!r} appears twice",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's problem and its line and column, without its quote of an unnamed "<unicode string>"."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return str(err)
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {context + ', ' if context else ''}{problem}"
