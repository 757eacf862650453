"""The training loop of one stage: optimizer groups, warmup + cosine, accumulation, autocast, metrics.

``run_stage`` trains ``model`` for a stage of a recipe. Every optimizer step is ``accum`` micro-batches
from the ``TrainStream``; the loss of each micro-batch is weighted by its share of the step's
supervised tokens, so the step's gradient is that of the mean over all its supervised tokens, whatever
the packing. Per step it records the loss and the loss of every source, the MoE auxiliary losses,
tokens/s and images/s, MFU (``mm15.train.flops``) against this machine's measured matmul rate, the
fraction of the step spent waiting for data, peak memory, the learning rate and the realised mixture.

A NaN or infinite loss stops the stage with ``NonFiniteLoss`` before the optimizer step, so the
weights and the last checkpoint stay good. Checkpoints (``mm15.train.checkpoint``) hold the model,
optimizer, scheduler, RNG states and the data stream's position, so a resumed stage continues the
identical loss curve.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from mm15.hardware import autocast
from mm15.model.mm15 import MM15Model
from mm15.train import distributed as D
from mm15.train.data import MicroBatch, Prefetcher, TrainStream
from mm15.train.flops import StepWork, image_work, mm15_flop_weights

MODULES = ("encoder", "connector", "llm", "routers")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the stage stopped before applying the step."""


def module_parameters(model: MM15Model) -> dict[str, list[torch.nn.Parameter]]:
    """The model's parameters by trainable module: encoder, connector, llm and the MoE routers."""
    routers = [p for name, p in model.llm.named_parameters() if ".router." in f".{name}"]
    router_ids = {id(p) for p in routers}
    return {
        "encoder": list(model.vision.parameters()),
        "connector": list(model.connector.parameters()),
        "llm": [p for p in model.llm.parameters() if id(p) not in router_ids],
        "routers": routers,
    }


def build_optimizer(
    model: MM15Model,
    trainable: Iterable[str],
    lr: dict[str, float],
    name: str = "adamw",
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """One parameter group per trainable module with its own learning rate; the rest is frozen."""
    trainable = set(trainable)
    unknown = trainable - set(MODULES)
    if unknown:
        raise ValueError(f"unknown trainable modules {sorted(unknown)}; choose from {MODULES}")
    groups = []
    for module, params in module_parameters(model).items():
        for p in params:
            p.requires_grad_(module in trainable)
        if module in trainable and params:
            groups.append({"params": params, "lr": lr[module], "name": module})
    if not groups:
        raise ValueError("no trainable parameters: the stage's trainable modules are all empty")
    if name == "adamw":
        # The fused kernel updates each parameter in one pass over its four tensors (parameter,
        # gradient, both moments) instead of a dozen foreach passes: about 6x less optimizer time on
        # SmolLM2 (a 15% shorter step), and what Hugging Face's Trainer uses by default since torch 2.8.
        return torch.optim.AdamW(groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: adamw or adafactor")


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class StepMetrics:
    step: int
    loss: float
    source_loss: dict[str, float]
    aux: dict[str, float]
    lr: float
    tokens_per_s: float
    images_per_s: float
    mfu: float
    data_wait: float
    peak_rss_gib: float
    supervised_tokens: int
    # A step whose loss or gradient norm was not finite, not applied (nan_policy 'skip'); its ``loss``
    # and ``source_loss`` are still the values measured (NaN where they were not finite).
    skipped: bool = False
    mixture: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


LOSS_WEIGHTINGS = ("token", "sample", "sqrt")


def token_weights(micro: MicroBatch, weighting: str) -> torch.Tensor:
    """The weight of each supervised token of ``micro`` (in the order of the model's supervised logits).

    ``token``: 1 each, the mean over all supervised tokens (MM1.5, LLaVA): a sample counts in
    proportion to its answer's length. ``sample``: 1 / n for a sample with n supervised tokens, so
    every sample counts equally, whatever its answer's length. ``sqrt``: 1 / sqrt(n), between the two
    (InternVL 2.5's "square averaging"). Long answers (OCR transcriptions, code) otherwise dominate a
    token mean, and short-answer tasks (a colour, a count, an option letter) get little gradient.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose from {LOSS_WEIGHTINGS}")
    supervised = micro.batch.labels[:, 1:] != -100
    owners = micro.token_sample[:, 1:][supervised]
    if weighting == "token":
        return torch.ones(owners.shape, dtype=torch.float32)
    counts = torch.bincount(owners, minlength=len(micro.samples)).float()
    per_sample = 1.0 / counts.clamp(min=1) if weighting == "sample" else counts.clamp(min=1).rsqrt()
    return per_sample[owners]


def train_step(
    model: torch.nn.Module,
    stream: TrainStream | Prefetcher,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    accum: int,
    step: int,
    dtype: torch.dtype,
    max_grad_norm: float,
    peak_flops: float,
    loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
    nan_policy: str = "error",
    loss_weighting: str = "token",
) -> StepMetrics:
    """One optimizer step over ``accum`` micro-batches (module docstring).

    ``model`` may be wrapped for data parallelism (``mm15.train.distributed.wrap_model``): the loss is
    then scaled so that averaging gradients over ranks gives the mean over the *global* batch's
    supervised tokens, gradients are reduced once per step (not per micro-batch), and the reported
    loss, per-source losses, tokens and images are global sums. ``peak_flops`` is one rank's rate.
    ``loss_weighting`` (``token_weights``) sets what the gradient averages over; the reported losses
    are always per-token means.
    """
    start = time.perf_counter()
    waited = 0.0
    micros = []
    for _ in range(accum):
        t = time.perf_counter()
        micros.append(stream.next_micro())
        waited += time.perf_counter() - t
    local_supervised = sum(int((m.batch.labels[:, 1:] != -100).sum()) for m in micros)
    total_supervised = D.global_token_count(local_supervised)
    if total_supervised == 0:
        raise RuntimeError(f"step {step}: no supervised tokens in {accum} micro-batches")
    weights = [token_weights(m, loss_weighting) for m in micros]
    total_weight = float(D.sum_across_ranks(torch.tensor([float(sum(w.sum() for w in weights))]))[0])
    world = D.world_size()
    names = stream.source_names
    # Per source: [sum of token losses, token count]; summed over ranks for the log.
    source_stats = torch.zeros(len(names), 2, dtype=torch.float64)
    loss_total = 0.0
    aux_total: dict[str, float] = {}
    tokens = images = patches = image_tokens = 0
    unwrapped = D.unwrap(model)
    finite, bad_value = True, 0.0
    for index, micro in enumerate(micros):
        batch = micro.batch
        with D.gradient_sync(model, enabled=index == len(micros) - 1):
            with autocast(dtype):
                out = model(pixel_values=micro.pixel_values, **batch.model_inputs())
            targets = batch.labels[:, 1:]
            supervised = targets != -100
            per_token = out.token_losses
            # This micro-batch's share of the global weighted mean, times the world size because the
            # ranks' gradients are averaged (mm15.train.distributed, "Loss equivalence").
            loss = (per_token * weights[index]).sum() * (world / total_weight)
            if out.aux:
                loss = loss + out.aux["total"] / len(micros)
                for key, value in out.aux.items():
                    aux_total[key] = aux_total.get(key, 0.0) + float(value.detach()) / len(micros)
            if loss_hook is not None:
                loss = loss_hook(loss)
            if finite and not bool(torch.isfinite(loss.detach())):
                finite, bad_value = False, float(loss.detach())
            # Backward runs even on a non-finite loss: every rank must join the same gradient reduction.
            loss.backward()
        loss_total += float(per_token.detach().sum())
        sources = micro.token_source[:, 1:][supervised]
        source_stats.index_add_(
            0,
            sources.long(),
            torch.stack([per_token.detach().double(), torch.ones_like(per_token, dtype=torch.float64)], 1),
        )
        tokens += batch.real_tokens
        images += micro.images
        micro_patches, micro_image_tokens = image_work(unwrapped, micro.pixel_values)
        patches += micro_patches
        image_tokens += micro_image_tokens
    all_finite = D.all_ranks_have_data(finite)  # a logical AND over ranks: stop (or skip) together
    where = f"the loss is {bad_value}" if not finite else "the loss is not finite on another rank"
    if all_finite:
        # A finite loss can still give an infinite or NaN gradient (an overflow in backward); clipping
        # would then write NaN into every weight. The norm is global, so the ranks agree on it.
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = D.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        all_finite = D.all_ranks_have_data(math.isfinite(norm))
        where = f"the gradient norm is {norm}"
    if not all_finite:
        optimizer.zero_grad(set_to_none=True)
        if nan_policy != "skip":
            raise NonFiniteLoss(f"step {step}: {where}; stopped before the update")
    else:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():
        # A skipped step still counts in the schedule; torch warns when the first one has no update.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
    # One reduction for every global figure: the sums, each rank's mean aux losses (every rank's model
    # reports the same keys), the samples per source so far (the realised mixture) and the per-source
    # loss sums.
    aux_keys = sorted(aux_total)
    used = stream.used
    local = [loss_total, tokens, images, patches, image_tokens, *(aux_total[k] for k in aux_keys)]
    local += [used.get(name, 0) for name in names]
    totals = D.sum_across_ranks(torch.cat([torch.tensor(local, dtype=torch.float64), source_stats.flatten()]))
    loss_total, tokens, images, patches, image_tokens = float(totals[0]), *(int(t) for t in totals[1:5])
    aux_total = {key: float(totals[5 + i]) / world for i, key in enumerate(aux_keys)}
    offset = 5 + len(aux_keys)
    used_total = {name: int(totals[offset + i]) for i, name in enumerate(names)}
    source_stats = totals[offset + len(names) :].reshape(len(names), 2)
    seconds = time.perf_counter() - start
    work = StepWork(tokens=tokens, supervised=total_supervised, patches=patches, image_tokens=image_tokens)
    step_flops = mm15_flop_weights(unwrapped).step_flops(work)
    return StepMetrics(
        step=step,
        # The loss measured, also on a skipped step (``skipped`` says it was not applied): a step is
        # skipped as well when the loss is finite and only the gradient is not.
        loss=loss_total / total_supervised,
        source_loss={
            names[i]: float(source_stats[i, 0] / source_stats[i, 1])
            for i in range(len(names))
            if source_stats[i, 1] > 0
        },
        aux=aux_total,
        lr=lr,
        tokens_per_s=tokens / seconds,
        images_per_s=images / seconds,
        mfu=step_flops / seconds / (peak_flops * world) if peak_flops > 0 else 0.0,
        data_wait=waited / seconds,
        peak_rss_gib=_peak_rss_gib(),
        supervised_tokens=total_supervised,
        skipped=not all_finite,
        mixture=stream.mixture_of(used_total),
    )
