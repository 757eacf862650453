"""Complete, atomic training checkpoints that load without unpickling anything.

A checkpoint is one directory ``<directory>/step-<step:08d>/``::

    model.safetensors        weights (tied weights stored once)
    optimizer.json           optimizer structure: param groups, non-tensor per-parameter state
    optimizer.safetensors    optimizer tensors, keyed by their path, e.g. ``state.3.exp_avg``
    scheduler.json           the LR scheduler's state_dict (plain numbers)
    rng.json                 Python ``random`` and NumPy legacy generator states
    rng.safetensors          torch CPU (and CUDA, if present) generator states as uint8 tensors
    extra_state.json         caller's state: data/mixture position, metrics so far, config
    meta.json                format version, step, file list and each file's SHA-256; written last =
                             the completeness marker

Nothing is ``torch.save``d: tensors go to safetensors and everything else to JSON, so loading a checkpoint
from an untrusted source cannot execute code. JSON cannot tell a tuple from a list or an ``int`` dict key
from a ``str`` one, and the optimizer needs both (``betas`` tuples; ``state`` keyed by int parameter
ids, silently dropped by ``Optimizer.load_state_dict`` if the keys come back as strings), so the JSON uses
three single-key tags: ``{"__tensor__": key}``, ``{"__tuple__": [...]}`` and ``{"__items__": [[k, v], ...]}``.

Atomicity: everything is written into ``.tmp-step-<step>-<random>/`` next to the final directory, each
file is fsynced, ``meta.json`` goes last, and the directory is renamed into place. A crash at any point
leaves either no ``step-*`` directory or a complete one; ``latest_checkpoint`` additionally only accepts
directories whose ``meta.json`` exists, holds every entry the loader uses in its type (a ``step`` that is
the directory's, a list of ``files``, a SHA-256 per file if any are recorded) and lists files that exist;
any other directory is warned about with the reason, and ``mm15 train --resume`` falls back past it.
Stale temp directories from a killed save are removed by the next successful save. Files and directory
get the modes the umask gives any new file (``mkdtemp`` and safetensors would leave them 0700 / 0600).

Integrity: ``meta.json`` records each file's SHA-256 (``"sha256": {name: hex digest}``, hashed after the
file is written and fsynced), and ``load_checkpoint`` checks every file against it before it reads or
changes anything: a file damaged since (a flipped block that still parses) raises
``CorruptCheckpointError`` naming it. Checkpoints written before the checksums existed (no ``"sha256"``)
load unchecked. ``latest_checkpoint`` / ``complete_checkpoints`` do not hash (they only list): a damaged
checkpoint is found when it is loaded, and ``mm15 train --resume`` then falls back to the one before.

Optimizer keys. A replicated run's ``optimizer.state_dict()`` keys per-parameter state by integer index
(the position in the param groups); FSDP2's ``get_optimizer_state_dict`` by parameter name (FQN).
``meta.json`` records which (``"optimizer_keys": "index" | "fqn"``), and ``load_checkpoint`` translates
to what the loading run needs, using the live model's parameter names in the optimizer's param-group order
(wrapper components such as DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` left out, as
FSDP2's names leave them out): index -> name by position, name -> index by name, so a name-keyed state
must list the same parameters per group as the live optimizer. Parameters without state (AdamW keeps
none for a parameter that never had a gradient) stay without. Hence any of one process, DDP and FSDP2
resumes any other's checkpoint, and the two keyings are still read as written.

Distributed use. Call ``save_checkpoint`` on every rank: in the replicated case (single process, DDP) only
rank 0 writes and the others return at once; ranks then meet at a barrier so that nobody reads a
checkpoint that is not there yet. When a ``torch.distributed`` process group is initialised and the model
has ``DTensor`` parameters (FSDP2), the sharded model and optimizer states are first gathered into full,
CPU-resident state dicts with ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` /
``get_optimizer_state_dict`` and ``StateDictOptions(full_state_dict=True, cpu_offload=True)`` -- a
collective, hence every rank takes part -- and rank 0 writes them in the same format. ``load_checkpoint``
runs on every rank (shared filesystem) and, for sharded models, re-shards with ``set_model_state_dict`` /
``set_optimizer_state_dict``. Every rank's RNG states are saved (gathered to rank 0; rank 0's are also the
file's top level), and a load on as many ranks restores each rank's own, so a model that draws random
numbers (MoE router jitter) resumes exactly; on another world size every rank gets rank 0's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

FORMAT = "mm15-checkpoint"
FORMAT_VERSION = 1
META_NAME = "meta.json"
MODEL_NAME = "model.safetensors"

_STEP_RE = re.compile(r"^step-(\d+)$")
_TMP_RE = re.compile(r"^\.tmp-step-(\d+)-")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = frozenset({_TENSOR, _TUPLE, _ITEMS})


class CorruptCheckpointError(ValueError):
    """A complete checkpoint whose files cannot be read (truncated or damaged after it was written).

    Unlike a checkpoint that does not fit the model (a ``ValueError`` too), an older checkpoint of the
    same run may still load: ``mm15 train --resume`` falls back to it.
    """


@contextlib.contextmanager
def _reading(folder: Path) -> Iterator[None]:
    """Turn the errors of unreadable checkpoint files into ``CorruptCheckpointError``s naming ``folder``."""
    try:
        yield
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{folder}: a checkpoint file cannot be read ({err})") from None


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- encoding


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor] | None, where: str) -> Any:
    """JSON-able form of ``value``; tensors are moved into ``tensors`` (keyed by path) if that is allowed."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise TypeError(
                f"{where}: value at {path or '<root>'} is a torch.Tensor, but {where} must be plain JSON "
                "(numbers, strings, lists, dicts); convert it with .item() or .tolist()"
            )
        if path in tensors:
            raise ValueError(f"{where}: two entries map to the same tensor key {path!r}")
        tensors[path] = value.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, _join(path, i), tensors, where) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, i), tensors, where) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) for k in value) and not (
            len(value) == 1 and next(iter(value)) in _TAGS
        )
        if plain:
            return {k: _encode(v, _join(path, k), tensors, where) for k, v in value.items()}
        for k in value:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{where}: key {k!r} at {path or '<root>'} is not a JSON scalar")
        return {_ITEMS: [[k, _encode(v, _join(path, k), tensors, where)] for k, v in value.items()]}
    raise TypeError(
        f"{where}: value at {path or '<root>'} has type {type(value).__name__}, which is not "
        "JSON-serialisable (checkpoints hold only numbers, strings, lists, dicts, tuples and tensors, "
        "and never pickle)"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag == _TENSOR:
                if inner not in tensors:
                    raise ValueError(
                        f"{where}: tensor {inner!r} is referenced but missing from its safetensors file"
                    )
                return tensors[inner]
            if tag == _TUPLE:
                return tuple(_decode(v, tensors, where) for v in inner)
            if tag == _ITEMS:
                return {k: _decode(v, tensors, where) for k, v in inner}
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ file writing


def _fsync(path: Path) -> None:
    # Opening read-only is enough for fsync on POSIX, for files and directories alike.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # Windows cannot open directories; NTFS renames are journaled anyway.
        _fsync(path)


def _write_json(path: Path, document: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_component(
    folder: Path, name: str, value: Any, tensors: dict[str, torch.Tensor] | None
) -> list[str]:
    """Write ``name.json`` (and ``name.safetensors`` if ``value`` held tensors); return the file names."""
    document = _encode(value, "", tensors, name)
    files = [f"{name}.json"]
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
        _fsync(folder / f"{name}.safetensors")
        files.append(f"{name}.safetensors")
    _write_json(folder / f"{name}.json", document)
    return files


def _read_component(folder: Path, name: str) -> Any:
    document = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return _decode(document, tensors, name)


def read_checkpoint_extra(path: str | Path) -> dict[str, Any]:
    """A complete checkpoint's ``extra_state`` alone, unverified (for messages before loading); an empty
    dict if it cannot be read, which ``load_checkpoint`` then reports properly."""
    try:
        extra = _read_component(Path(path), "extra_state")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # damage: load_checkpoint names it
        return {}
    return extra if isinstance(extra, dict) else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_checksums(folder: Path, meta: Mapping[str, Any]) -> None:
    """``CorruptCheckpointError`` naming the first file whose SHA-256 differs from the one in meta.json.

    Checkpoints from before the checksums (no ``"sha256"`` in meta.json) pass unchecked.
    """
    sums = meta.get("sha256")
    if sums is None:
        return
    if not isinstance(sums, dict):
        raise CorruptCheckpointError(f"{folder}: {META_NAME}'s sha256 entry is not a mapping")
    for name in meta["files"]:
        expected = sums.get(name)
        if not isinstance(expected, str):
            raise CorruptCheckpointError(f"{folder}: {META_NAME} records no SHA-256 for {name}")
        with _reading(folder):
            actual = _sha256(folder / name)
        if actual != expected:
            raise CorruptCheckpointError(
                f"{folder}: {name} is damaged: its SHA-256 differs from the one {META_NAME} recorded "
                "when it was written"
            )


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask's set-and-restore races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path, files: list[str]) -> None:
    """Give ``folder`` (from mkdtemp, 0700) and its ``files`` (safetensors writes 0600) the usual modes."""
    mask = _umask()
    for name in files:
        os.chmod(folder / name, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


# ------------------------------------------------------------------------------------------- RNG states


def _capture_rng() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _gather_rng(state: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's RNG ``state``, in rank order (a collective); None in a single process."""
    if not _dist_initialised() or torch.distributed.get_world_size() == 1:
        return None
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def _own_rng_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """This rank's part of a saved RNG ``state``: its own when the checkpoint has one per rank of this
    world size (rank 0's at the top level, the others' in ``other_ranks``), else rank 0's."""
    others = state.get("other_ranks")
    if others is None or not _dist_initialised() or len(others) + 1 != torch.distributed.get_world_size():
        return state
    rank = torch.distributed.get_rank()
    return others[rank - 1] if rank else state


def _check_rng_state(state: Any, folder: Path) -> None:
    """``CorruptCheckpointError`` unless ``state`` (and each rank's part) can be restored, checked before
    the model is touched (a damaged rng file failed only after the weights were loaded, and with no
    fall-back)."""
    try:
        others = state.get("other_ranks", [])
        if not isinstance(others, list):
            raise TypeError("other_ranks is not a list")
        for part in [state, *others]:
            _check_one_rng_state(part)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(f"{folder}: the RNG state cannot be restored ({err})") from None


def _check_one_rng_state(state: Any) -> None:
    version, internal, _ = state["python"]
    random.Random().setstate((version, tuple(internal), None))
    keys = state["numpy"]["keys"]
    if len(keys) != 624:  # MT19937's state words
        raise ValueError(f"numpy's state has {len(keys)} words, not 624")
    torch_state = state["torch_cpu"]
    if not isinstance(torch_state, torch.Tensor) or torch_state.shape != torch.get_rng_state().shape:
        raise ValueError("torch's CPU generator state has the wrong size")


def _restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            raise ValueError(
                f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this process sees "
                f"{torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------- distributed


def _dist_initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _resolve_rank(rank: int | None) -> int:
    if rank is not None:
        return rank
    return torch.distributed.get_rank() if _dist_initialised() else 0


def _is_sharded(model: nn.Module) -> bool:
    if not _dist_initialised():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _full_state_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _barrier() -> None:
    if _dist_initialised():
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------ model weights


def _tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """For each state-dict name whose tensor is shared (tied weights): the other names of that tensor."""
    by_identity: dict[int, list[str]] = defaultdict(list)
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_identity[id(tensor)].append(name)
    return {
        n: [m for m in names if m != n] for names in by_identity.values() if len(names) > 1 for n in names
    }


def _write_gathered_model(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    # A gathered state dict has no module to let save_model find ties, so drop the aliases ourselves.
    ties = _tie_groups(model)
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not any(alias in kept for alias in ties.get(name, ())):
            kept[name] = tensor.detach().cpu().contiguous()
    save_file(kept, str(path), metadata={"format": "pt"})


def _read_model_state(folder: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as a full state dict for ``model``, validated against its keys and shapes."""
    weights = folder / MODEL_NAME
    expected = model.state_dict()  # DTensor entries report their global shape, so this works sharded too
    with safe_open(str(weights), framework="pt") as f:
        stored_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    ties = _tie_groups(model)
    source: dict[str, str] = {}  # model key -> file key (tied aliases were saved once)
    for key in expected:
        candidates = [key, *ties.get(key, ())]
        found = next((c for c in candidates if c in stored_shapes), None)
        if found is not None:
            source[key] = found
    missing = sorted(k for k in expected if k not in source)
    unexpected = sorted(k for k in stored_shapes if k not in expected and k not in source.values())
    mismatched = [
        f"{k}: checkpoint {list(stored_shapes[f])} vs model {list(expected[k].shape)}"
        for k, f in source.items()
        if stored_shapes[f] != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append("shape mismatch:\n  " + "\n  ".join(mismatched[:10]))
        if missing:
            problems.append(f"missing from checkpoint: {missing[:10]}")
        if unexpected:
            problems.append(f"not in model: {unexpected[:10]}")
        raise ValueError(f"{weights} does not match the model ({'; '.join(problems)})")
    stored = load_file(str(weights))
    return {k: stored[f] for k, f in source.items()}


# ------------------------------------------------------------------------------------------------- save


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    extra_state: Mapping[str, Any],
    keep_last: int,
    rank: int | None = None,
) -> Path:
    """Atomically write ``directory/step-<step:08d>/`` and keep only the newest ``keep_last`` checkpoints.

    ``scheduler`` is anything with ``state_dict()`` returning plain numbers (``LambdaLR``, ours);
    ``extra_state`` must be plain JSON. Either one holding anything else raises ``TypeError`` naming the
    entry, before anything is written. ``rank`` defaults to the process-group rank (0 without one); see the
    module docstring for the distributed protocol. Returns the checkpoint path (on every rank).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    directory = Path(directory)
    final = directory / step_dir_name(step)
    rank = _resolve_rank(rank)
    sharded = _is_sharded(model)
    # Every rank's RNG, captured before anything below could draw from it (a collective).
    rng_state = _capture_rng()
    rank_rng_states = _gather_rng(rng_state)

    model_state: Mapping[str, torch.Tensor] | None = None
    optim_state: Any = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        # Collectives: every rank must take part, though only rank 0 ends up with the full tensors.
        model_state = get_model_state_dict(model, options=_full_state_options())
        if optimizer is not None:
            optim_state = get_optimizer_state_dict(model, optimizer, options=_full_state_options())
    elif optimizer is not None:
        optim_state = optimizer.state_dict()
    if rank != 0:
        _barrier()
        return final

    if rank_rng_states is not None:  # rank 0's at the top level, as a single process saves them
        rng_state = {**rng_state, "other_ranks": rank_rng_states[1:]}
    scheduler_state = scheduler.state_dict() if scheduler is not None else None
    # Fail on non-JSON values before creating any directory.
    _encode(scheduler_state, "", None, "scheduler")
    _encode(extra_state, "", None, "extra_state")

    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=directory))
    try:
        if model_state is not None:
            _write_gathered_model(model_state, model, tmp / MODEL_NAME)
        else:
            save_model(model, str(tmp / MODEL_NAME))  # drops tied aliases; load restores them from the module
        _fsync(tmp / MODEL_NAME)
        files = [MODEL_NAME]
        files += _write_component(tmp, "optimizer", optim_state, {})
        files += _write_component(tmp, "scheduler", scheduler_state, None)
        files += _write_component(tmp, "rng", rng_state, {})
        files += _write_component(tmp, "extra_state", dict(extra_state), None)
        files.sort()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            # Sharded runs key optimizer state by name, replicated ones by index; loading translates.
            "optimizer_keys": "fqn" if sharded else "index",
            "files": files,
            # Read back from the page cache at ~1 GB/s: hundreds of MB add a fraction of a second.
            "sha256": {name: _sha256(tmp / name) for name in files},
            "torch_version": torch.__version__,
        }
        _write_json(tmp / META_NAME, meta)
        _apply_umask(tmp, [*files, META_NAME])
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    _prune(directory, keep_last, final)
    _barrier()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(tmp, final)
        return
    # Re-saving a step (e.g. after resuming from an older checkpoint): rename() cannot replace a non-empty
    # directory, so move the old one aside under a temp name that the next prune recognises as stale.
    old = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-replaced-", dir=final.parent))
    os.rmdir(old)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old)


def _complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    found = []
    if not directory.is_dir():
        return found
    for child in directory.iterdir():
        match = _STEP_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        problem = _incomplete_reason(child)
        if problem is None:
            found.append((int(match.group(1)), child))
        else:
            warnings.warn(f"ignoring incomplete checkpoint directory {child} ({problem})", stacklevel=3)
    return sorted(found)


def _is_complete(folder: Path) -> bool:
    return _incomplete_reason(folder) is None


def _incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None if it is.

    Every meta.json entry the loader relies on is checked here, not only the format and the files: a meta
    with a ``"step"`` of ``"x"`` passed as complete, ``--resume --check`` promised a resume, and the load
    then failed on ``int("x")`` instead of falling back to the checkpoint before.
    """
    try:
        meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no valid {META_NAME}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{META_NAME} is not an mm15 checkpoint's"
    step = meta.get("step")
    # bool is an int subclass; JSON's true is no step.
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"{META_NAME}'s step must be an integer >= 0, got {step!r}"
    match = _STEP_RE.match(folder.name)
    if match is not None and int(match.group(1)) != step:
        return f"{META_NAME}'s step {step} is not the directory's {int(match.group(1))}"
    files = meta.get("files")
    if not isinstance(files, list) or not files or not all(_is_plain_name(name) for name in files):
        return f"{META_NAME}'s files must be a list of file names, got {files!r}"
    sums = meta.get("sha256")
    # Checkpoints written before the checksums (no "sha256") load unchecked; a present entry must cover
    # every file with a hex digest, or the load would stop on it instead of falling back.
    if sums is not None:
        if not isinstance(sums, dict):
            return f"{META_NAME}'s sha256 entry is not a mapping"
        for name in files:
            digest = sums.get(name)
            if not (isinstance(digest, str) and _SHA256_RE.fullmatch(digest)):
                return f"{META_NAME} records no valid SHA-256 for {name} (got {digest!r})"
    if meta.get("optimizer_keys") not in (None, "index", "fqn"):
        return f"{META_NAME}'s optimizer_keys must be 'index' or 'fqn', got {meta.get('optimizer_keys')!r}"
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def _is_plain_name(name: Any) -> bool:
    """A file name inside the checkpoint directory (not a path out of it)."""
    plain = isinstance(name, str) and name not in ("", ".", "..")
    return plain and "/" not in name and "\\" not in name


def _prune(directory: Path, keep_last: int, just_written: Path) -> None:
    complete = _complete_checkpoints(directory)
    for _, path in complete[:-keep_last]:
        if path != just_written:
            shutil.rmtree(path)
    newest = complete[-1][0] if complete else -1
    for child in directory.iterdir():
        match = _TMP_RE.match(child.name)
        # Single writer: a temp dir at or below the newest complete step is a killed save, never in progress.
        if match and child.is_dir() and int(match.group(1)) <= newest:
            shutil.rmtree(child)


# ------------------------------------------------------------------------------------------------- load


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """The complete checkpoints in ``directory``, oldest first (incomplete ones are warned about)."""
    return [path for _, path in _complete_checkpoints(Path(directory))]


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint directory (``step-XXXXXXXX``) holds."""
    match = _STEP_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step-XXXXXXXX)")
    return int(match.group(1))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``, or None if there is none."""
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore model, optimizer, scheduler and RNG states from ``path``; return ``(step, extra_state)``.

    Everything is read and validated before anything is changed, so a mismatch (shapes, parameter groups,
    missing state) raises ``ValueError``, and files that cannot be read or fail their SHA-256 check
    ``CorruptCheckpointError``, and either leaves the model and optimizer as they were. The optimizer
    state is translated between index and name keys as this run needs (module docstring), so a
    checkpoint of one process, DDP or FSDP2 resumes under any of them. Pass
    ``optimizer=None`` / ``scheduler=None`` to load weights only. Call on every rank.
    """
    folder = Path(path)
    if (problem := _incomplete_reason(folder)) is not None:
        raise FileNotFoundError(f"{folder} is not a complete mm15 checkpoint ({problem})")
    meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: unsupported checkpoint format_version {meta.get('format_version')!r}")
    sharded = _is_sharded(model)
    _verify_checksums(folder, meta)

    with _reading(folder):
        model_state = _read_model_state(folder, model)
        optim_state = _read_component(folder, "optimizer")
        scheduler_state = _read_component(folder, "scheduler")
        rng_state = _read_component(folder, "rng")
        extra_state = _read_component(folder, "extra_state")
    if optimizer is not None:
        if optim_state is None:
            raise ValueError(f"{folder} holds no optimizer state, but an optimizer was given to restore")
        optim_state = _rekey_optimizer_state(
            optim_state, meta.get("optimizer_keys"), model, optimizer, "fqn" if sharded else "index", folder
        )
        _validate_optimizer_state(optim_state, optimizer, folder)
    if scheduler is not None and scheduler_state is None:
        raise ValueError(f"{folder} holds no scheduler state, but a scheduler was given to restore")
    if scheduler is not None:
        # load_state_dict only updates the keys it is given: a state without "last_epoch" would restart
        # the schedule (warm-up again) silently.
        missing = sorted(set(scheduler.state_dict()) - set(scheduler_state))
        if missing:
            raise CorruptCheckpointError(f"{folder}: the scheduler state lacks {missing}")
    _check_rng_state(rng_state, folder)

    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if optimizer is not None:
            # Not strict: AdamW keeps no state for parameters that never had a gradient (the encoder's
            # post-layernorm, after the feature layer), and strict loading refused every FSDP2 resume.
            loose = StateDictOptions(full_state_dict=True, strict=False)
            set_optimizer_state_dict(model, optimizer, optim_state, options=loose)
    else:
        model.load_state_dict(model_state, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    _restore_rng(_own_rng_state(rng_state))
    return int(meta["step"]), extra_state


# --------------------------------------------------------------------------------------- optimizer keys

# Attribute names under which wrappers hold the wrapped module: not part of a parameter's canonical name.
_WRAPPER_ATTRS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` as FSDP2's ``get_optimizer_state_dict`` keys it: the first name of each
    parameter (tied ones once), without wrapper components (DDP's ``module.``, ``torch.compile``'s
    ``_orig_mod.``, activation checkpointing's ``_checkpoint_wrapped_module.``)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        module, kept = model, []
        *path, leaf = name.split(".")
        for part in path:
            is_wrapper = part in _WRAPPER_ATTRS or (
                part == "module" and isinstance(module, (DistributedDataParallel, DataParallel))
            )
            if not is_wrapper:
                kept.append(part)
            module = getattr(module, part)
        names.setdefault(id(param), ".".join([*kept, leaf]))
    return names


def _stored_keys(state: Mapping[str, Any], recorded: Any, folder: Path) -> str:
    if recorded in ("index", "fqn"):
        return recorded
    if recorded is not None:
        raise ValueError(f"{folder}: unknown optimizer_keys {recorded!r} in {META_NAME} (index or fqn)")
    params = [p for group in state["param_groups"] for p in group["params"]]
    return "fqn" if params and all(isinstance(p, str) for p in params) else "index"


def _rekey_optimizer_state(
    state: Mapping[str, Any],
    stored: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    wanted: str,
    folder: Path | str = "optimizer state",
) -> dict[str, Any]:
    """``state`` (keyed by index or name, ``stored`` says which; None: tell by the keys) keyed as ``wanted``.

    Index -> name goes by position in the param groups (what ``Optimizer.load_state_dict`` does); name ->
    index and name -> name by name, so a name-keyed state must list, per group, the parameters of the
    live optimizer's group (in any order); the result lists them in the live order. Per-parameter
    state values and group settings are passed through unchanged; parameters without state stay without.
    """
    stored = _stored_keys(state, stored, folder)
    if stored == wanted == "index":
        return dict(state)  # as written: no names needed
    saved_groups, groups = state["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{folder}: checkpoint optimizer has {len(saved_groups)} param groups, "
            f"this optimizer {len(groups)}"
        )
    names = _parameter_names(model)
    live: list[list[str]] = []
    for i, group in enumerate(groups):
        foreign = sum(id(p) not in names for p in group["params"])
        if foreign:
            raise ValueError(
                f"{folder}: optimizer param group {i} holds {foreign} tensors that are not parameters of "
                "the model, so its state cannot be matched by parameter name"
            )
        live.append([names[id(p)] for p in group["params"]])

    # Key by name, groups in the live order.
    name_of: dict[Any, str] = {}
    by_name_groups = []
    for i, (saved, here) in enumerate(zip(saved_groups, live, strict=True)):
        if len(saved["params"]) != len(here):
            raise ValueError(
                f"{folder}: optimizer param group {i} has {len(saved['params'])} parameters in the "
                f"checkpoint, {len(here)} here"
            )
        if stored == "index":
            name_of.update(zip(saved["params"], here, strict=True))
        else:
            only_saved = sorted(set(saved["params"]) - set(here))
            only_here = sorted(set(here) - set(saved["params"]))
            if only_saved or only_here:
                raise ValueError(
                    f"{folder}: optimizer param group {i} lists other parameters in the checkpoint than "
                    f"here (only in the checkpoint: {only_saved[:5]}; only here: {only_here[:5]})"
                )
            name_of.update((n, n) for n in here)
        by_name_groups.append({**saved, "params": here})
    by_name_state = {}
    for key, per_param in state["state"].items():
        if key not in name_of:
            raise ValueError(f"{folder}: optimizer state for parameter {key!r}, which no param group lists")
        by_name_state[name_of[key]] = per_param
    if wanted == "fqn":
        return {"state": by_name_state, "param_groups": by_name_groups}

    # Name -> index: the running position over the live groups, as Optimizer.state_dict() numbers them.
    index_of = {n: i for i, n in enumerate(chain.from_iterable(live))}
    return {
        "state": {index_of[n]: per_param for n, per_param in by_name_state.items()},
        "param_groups": [
            {**group, "params": [index_of[n] for n in group["params"]]} for group in by_name_groups
        ],
    }


def _validate_optimizer_state(
    state: Mapping[str, Any], optimizer: torch.optim.Optimizer, folder: Path
) -> None:
    saved_groups = state["param_groups"]
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"{folder}: checkpoint optimizer has {len(saved_groups)} param groups, "
            f"this optimizer {len(groups)}"
        )
    param_of: dict[Any, torch.Tensor] = {}
    for i, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{folder}: optimizer param group {i} has {len(saved['params'])} parameters in the "
                f"checkpoint, {len(group['params'])} here"
            )
        param_of.update(zip(saved["params"], group["params"], strict=True))
    for key, per_param in state["state"].items():
        if key not in param_of:
            raise ValueError(f"{folder}: optimizer state for parameter {key!r}, which no param group lists")
        param = param_of[key]
        for name, value in per_param.items():
            # Same-rank state (Adam moments, momentum) must match the parameter, except in dimensions of 1
            # (Adafactor's factored second moments keep the factored-out dimension with size 1); lower-rank
            # state (scalars) is the optimizer's business.
            if (
                isinstance(value, torch.Tensor)
                and value.dim() == param.dim()
                and not all(s in (p, 1) for s, p in zip(value.shape, param.shape, strict=True))
            ):
                raise ValueError(
                    f"{folder}: optimizer state {key}.{name} has shape {list(value.shape)}, "
                    f"its parameter {list(param.shape)}"
                )


# ----------------------------------------------------------------------------------------------- export


def export_final(
    model: nn.Module, out_dir: str | Path, rank: int | None = None, files: Mapping[str, str] | None = None
) -> Path:
    """Write the trained model for inference: ``model.save_pretrained(out_dir)`` (config + safetensors),
    and ``files`` (name -> text) beside it, in the same atomic rename.

    A module without ``save_pretrained`` gets its weights alone as ``out_dir/model.safetensors``. Call it on
    every rank: a sharded (FSDP2) model is gathered first (a collective), then rank 0 loads the full
    weights into a fresh unsharded copy built from the model's config and saves that. Only rank 0 writes;
    every rank returns after the files exist.
    """
    out = Path(out_dir)
    full_state: Mapping[str, torch.Tensor] | None = None
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full_state = get_model_state_dict(model, options=_full_state_options())
    if _resolve_rank(rank) != 0:
        _barrier()
        return out
    if full_state is not None:
        if not hasattr(type(model), "build"):
            raise TypeError(f"cannot export a sharded {type(model).__name__}: it has no build(cfg)")
        plain = type(model).build(model.cfg)  # type: ignore[attr-defined]
        plain.load_state_dict(full_state)
        model = plain
    # Written beside ``out`` and renamed into place when complete: a kill mid-export left a final/
    # with config.json and half the weights, which later runs took for a finished stage.
    out.parent.mkdir(parents=True, exist_ok=True)
    # A staging folder of an export that was killed (one writer per run directory: the run's lock).
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_pretrained = getattr(model, "save_pretrained", None)
        if callable(save_pretrained):
            save_pretrained(staging)
        else:
            save_model(model, str(staging / MODEL_NAME))
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync_dir(staging)
        if out.exists():
            shutil.rmtree(out)  # an earlier export of this stage (or a partial one): replaced whole
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the exported model from other users
        os.replace(staging, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _barrier()
    return out
