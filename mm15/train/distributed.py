"""Data-parallel training: process group set-up, DDP / FSDP2 wrapping, and the global-mean loss.

``init_distributed`` reads the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
starts a gloo process group on CPU (nccl with CUDA); a single process needs none. ``wrap_model`` wraps an
``MM15Model`` for a strategy:

* ``"none"``: the model itself.
* ``"ddp"``: ``DistributedDataParallel`` without ``find_unused_parameters`` (that option costs a graph
  walk every step and does not fix the text-only case anyway). Parameters that *never* get a gradient --
  the vision encoder's ``post_layernorm`` and any block after ``feature_layer`` (``VisionEncoder`` runs
  only the blocks up to it) -- are frozen before wrapping, so DDP's reducer does not wait for them.
* ``"fsdp2"``: ``fully_shard`` on every decoder layer and every vision block that runs, then on the root,
  on a 1-D device mesh; with ``mixed_precision=torch.bfloat16`` a ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`` (only then: fp32 stays exact fp32).

``unwrap(model)`` gives the ``MM15Model`` back (``DDP.module``; FSDP2 shards in place, so the model is
its own unwrap); use it for ``build_optimizer``, ``save_checkpoint`` and ``load_checkpoint`` (a DDP
wrapper would prefix every key with ``module.``). Order: ``wrap_model(model, ..., trainable=...)`` first,
then ``build_optimizer(unwrap(model), ...)`` -- FSDP2 replaces the parameters by sharded ``DTensor``s, and
DDP must see the stage's final ``requires_grad`` flags when it is built (``trainable`` sets them).

**Ranks whose batch has no image.** A text-only micro-batch never runs the vision encoder and the
connector. Under DDP their parameters get no gradient on that rank, the reducer waits for them, and the
next step fails ("Expected to have finished reduction") or the ranks hang in mismatched all-reduces. Under
FSDP2 it is worse: every sharded vision block all-gathers its parameters in forward and reduce-scatters
its gradient in backward, so the rank that skips them runs a different sequence of collectives. Both are
fixed by ``wrap_model``'s *image guard* (installed for ``ddp`` and ``fsdp2``): a forward pre-hook on the
``MM15Model`` that, when the call has no ``pixel_values``, runs the encoder and connector on one all-zero
tile -- at the start of ``forward``, where ranks with images run them too, so the collective order is the
same on every rank -- and a forward post-hook that adds ``0 * sum(features)`` to the output logits (and
loss). The gradient is exactly zero but every encoder/connector parameter takes part in backward. It costs
one tile's encoder pass on image-free micro-batches only. ``touch_unused_branches(model, loss)`` is the
complementary loss hook (``train_step(loss_hook=...)``) for replicated models: every trainable parameter
that the loss's autograd graph does not reach (e.g. an MoE expert no token was routed to, or the encoder
of an unguarded model) gets ``0 * p.sum()`` added, so DDP sees a (zero) gradient for it.

**Loss equivalence.** ``train_step`` normalises each rank's loss by the rank-local supervised token
count; DDP and FSDP2 *average* gradients over ranks, which equals the gradient of the mean over all
ranks' supervised tokens only if every rank has the same count. With ``n_r`` tokens on rank ``r``,
``N = sum_r n_r`` (``global_token_count``) and ``W`` ranks, scaling rank ``r``'s mean loss by
``W * n_r / N`` (``scale_for_global_mean``) makes the averaged gradient ``1/W * sum_r W n_r/N *
grad(mean_r) = grad(sum of all token losses) / N``, the single-process gradient over the global batch.

**Stopping together.** A rank that runs out of data must not simply leave the loop (the others would
block in the next collective). Loops ask ``all_ranks_have_data(has_next)`` (an all-reduce MIN) before each
step and stop on every rank as soon as one rank is out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("none", "ddp", "fsdp2")
_GUARD_ATTR = "_mm15_image_guard"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> DistInfo:
    """Join the ``torchrun`` process group (gloo on CPU, nccl with CUDA); a no-op for one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, False)
    if not is_distributed():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", rank=rank, world_size=world_size)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, True)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def cleanup(wait: bool = True) -> None:
    """Wait for every rank (``wait``), then destroy the process group.

    Without the barrier a fast rank can tear down its gloo connections while a peer is still in its
    last collective, and the peer's transport thread aborts the process ("terminate called without an
    active exception"); without the destroy some backends abort at interpreter exit. A rank leaving on
    an error of its own (its data, say) must not wait: its peers are in a training collective that it
    will never join, and both would sit there until gloo's 30-minute timeout. Leaving at once ends it,
    and torchrun stops the other ranks.
    """
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


# ------------------------------------------------------------------------------------------- collectives


def _reduce_int(value: int, op: Any) -> int:
    """One integer reduced over all ranks with ``op`` (``value`` itself without a process group)."""
    if not is_distributed():
        return int(value)
    reduced = torch.tensor([int(value)], dtype=torch.long, device=_device())
    dist.all_reduce(reduced, op=op)
    return int(reduced.item())


def global_token_count(local: int) -> int:
    """The sum of ``local`` over all ranks (``local`` itself without a process group)."""
    return _reduce_int(local, dist.ReduceOp.SUM)


def all_ranks_have_data(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank: ask before each step and stop together on False."""
    return bool(_reduce_int(1 if flag else 0, dist.ReduceOp.MIN))


def max_across_ranks(value: int) -> int:
    """The largest ``value`` of all ranks (``value`` itself without a process group)."""
    return _reduce_int(value, dist.ReduceOp.MAX)


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (``values`` itself without a process group)."""
    if not is_distributed():
        return values
    total = values.detach().clone().to(_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` without a process group)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm``; returns the norm before clipping.

    Replicated gradients (one process, DDP) go to ``torch.nn.utils.clip_grad_norm_``. FSDP2 gradients are
    dim-0 shards (``DTensor``): the squared norm is summed over each rank's local shard and all-reduced,
    which is exact and avoids the ``DTensor`` norm path that fails for some parameter groups on CPU
    (an in-place ``pow_`` on a partial placement).
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    squared = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if isinstance(g, DTensor):
            if not all(placement.is_shard() for placement in g.placements):
                raise ValueError(f"clip_grad_norm_: unexpected gradient placements {g.placements}")
            squared += g.to_local().double().pow(2).sum()
        elif rank() == 0:  # a replicated gradient counts once
            squared += g.double().pow(2).sum()
    total = float(sum_across_ranks(squared.reshape(1))[0]) ** 0.5
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return total


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for accumulation micro-batches (not the last one).

    DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync``; a plain module: nothing to skip. Gradients
    accumulate locally and the last micro-batch's backward reduces the sum once.
    """
    from torch.nn.parallel import DistributedDataParallel

    if enabled or not is_distributed():
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def scale_for_global_mean(
    loss: torch.Tensor, local_count: int, global_count: int, world_size: int
) -> torch.Tensor:
    """Rank-local mean loss scaled so that gradient *averaging* gives the global token mean.

    ``loss`` is the mean over this rank's ``local_count`` supervised tokens; the result is
    ``loss * world_size * local_count / global_count`` (module docstring). A rank with no supervised tokens
    (its mean is NaN) contributes an exact zero that still keeps the graph, so backward runs everywhere.
    """
    if global_count <= 0:
        raise ValueError(f"global_count must be > 0, got {global_count}")
    if local_count == 0:
        return torch.nan_to_num(loss, nan=0.0) * 0.0
    return loss * (world_size * local_count / global_count)


# ----------------------------------------------------------------------------------------------- wrapping


def unwrap(model: nn.Module) -> nn.Module:
    """The ``MM15Model`` inside a wrapper (``DDP.module``); FSDP2 models are their own unwrap."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    """The vision blocks the encoder actually runs (up to its feature layer)."""
    vision = model.vision
    return list(vision.model.encoder.layers[: vision._num_blocks_run])


def never_used_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Vision parameters no forward uses: ``post_layernorm``, heads, blocks past ``feature_layer``."""
    hf = model.vision.model
    used = {id(p) for block in vision_blocks(model) for p in block.parameters()}
    used |= {id(p) for p in hf.embeddings.parameters()}
    pre = getattr(hf, "pre_layrnorm", None)
    if pre is not None:
        used |= {id(p) for p in pre.parameters()}
    return [(f"vision.model.{n}", p) for n, p in hf.named_parameters() if id(p) not in used]


def set_trainable(model: nn.Module, trainable: Any) -> None:
    """``requires_grad`` per module as ``build_optimizer`` sets it (encoder, connector, llm, routers)."""
    from mm15.train.trainer import MODULES, module_parameters

    trainable = set(trainable)
    unknown = trainable - set(MODULES)
    if unknown:
        raise ValueError(f"unknown trainable modules {sorted(unknown)}; choose from {MODULES}")
    for module, params in module_parameters(model).items():
        for p in params:
            p.requires_grad_(module in trainable)


def _pixel_values_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "pixel_values" in kwargs:
        return kwargs["pixel_values"]
    return args[2] if len(args) > 2 else None


def install_image_guard(model: nn.Module, always: bool = False) -> None:
    """Run encoder + connector on a zero tile when a call has no images (module docstring); idempotent.

    Only in training (grad enabled), unless ``always``: FSDP2 needs it in evaluation too, since its
    forward all-gathers are collectives as well.
    """
    if getattr(model, _GUARD_ATTR, False):
        return
    state: dict[str, torch.Tensor | None] = {"features": None}

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state["features"] = None
        pixels = _pixel_values_of(args, kwargs)
        if (not always and not torch.is_grad_enabled()) or (pixels is not None and pixels.shape[0] > 0):
            return
        encoder_params = [*module.vision.parameters(), *module.connector.parameters()]
        if not always and not any(p.requires_grad for p in encoder_params):
            return
        size = module.vision.input_size
        dtype = next(module.vision.parameters()).dtype
        device = args[0].device if args else kwargs["input_ids"].device
        dummy = torch.zeros(1, 3, size, size, dtype=dtype, device=device)
        state["features"] = module.encode_images(dummy)

    def post_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        features = state["features"]
        state["features"] = None
        if features is None or not torch.is_grad_enabled():
            return output
        zero = features.float().sum() * 0.0
        if output.logits is not None:
            output.logits = output.logits + zero.to(output.logits.dtype)
        if output.token_losses is not None:
            output.token_losses = output.token_losses + zero
        if output.loss is not None:
            output.loss = output.loss + zero
        return output

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True)
    setattr(model, _GUARD_ATTR, True)


def wrap_model(
    model: nn.Module,
    strategy: str = "none",
    mixed_precision: torch.dtype | None = None,
    trainable: Any = None,
) -> nn.Module:
    """Wrap an ``MM15Model`` for data parallelism (module docstring); ``trainable`` sets requires_grad."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if mixed_precision not in (None, torch.float32, torch.bfloat16):
        raise ValueError(
            f"mixed_precision must be None, torch.float32 or torch.bfloat16, got {mixed_precision}"
        )
    if trainable is not None:
        set_trainable(model, trainable)
    if strategy == "none":
        return model
    if not is_distributed():
        raise RuntimeError(
            f"strategy {strategy!r} needs a process group: call init_distributed() under torchrun"
        )
    for _, p in never_used_parameters(model):
        p.requires_grad_(False)
    install_image_guard(model, always=strategy == "fsdp2")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if mixed_precision == torch.bfloat16:
            raise ValueError("DDP keeps fp32 weights: use bf16 autocast (train_step's dtype) instead")
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        if torch.cuda.is_available():
            model.to(_device())
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if torch.cuda.is_available():
        model.to(_device())
    mesh = init_device_mesh(_device().type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision == torch.bfloat16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in vision_blocks(model):
        fully_shard(block, **kwargs)
    for layer in model.llm.get_decoder().layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---------------------------------------------------------------------------------------- unused branches


def _reached_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors whose gradient ``loss.backward()`` would accumulate."""
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return reached


def touch_unused_branches(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` plus ``0 * p.sum()`` for every trainable parameter its graph does not reach (DDP-safe).

    For replicated models (none, DDP): the returned loss has the same value and the same gradients, but
    every trainable parameter takes part in backward. Sharded (FSDP2) models are returned unchanged: their
    forward uses unsharded copies of the parameters, and the image guard installed by ``wrap_model`` keeps
    their collectives in step instead (module docstring).
    """
    base = unwrap(model)
    from torch.distributed.tensor import DTensor

    params = [p for p in base.parameters() if p.requires_grad]
    if any(isinstance(p, DTensor) for p in params):
        return loss
    reached = _reached_parameters(loss)
    missing = [p for p in params if id(p) not in reached]
    if not missing:
        return loss
    zero = sum(p.float().sum() for p in missing) * 0.0
    return loss + zero.to(loss.dtype)
