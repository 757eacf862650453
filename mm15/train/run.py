"""``mm15 train RECIPE``: run a recipe's stages in order, with checkpoints, resume, logs, plots and a summary.

Layout of a run directory (``--out``, default the recipe's ``output_dir``)::

    <run>/<stage>/checkpoints/step-XXXXXXXX/   complete checkpoints (mm15.train.checkpoint), last N kept
    <run>/<stage>/final/                       the stage's model (save_pretrained): the next stage's parent,
                                               and mm15_stage.json, the settings it was trained with
    <run>/<stage>/metrics.jsonl                one line of metrics per step
    <run>/<stage>/tensorboard/                 the same as TensorBoard scalars
    <run>/<stage>/loss.png                     the loss curves (total and per source)
    <run>/summary.md                           one row per stage: steps, first and last loss, speed, skips
    <run>/.lock                                held (flock) by the training process writing the run

A stage whose ``final/`` exists is done and is skipped (with a warning naming the settings that differ
when the recipe has changed since); with ``--resume`` an interrupted stage continues from its latest
checkpoint and reproduces the uninterrupted loss curve exactly. ``summary.md`` is rewritten after every
stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import signal
import sys
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from safetensors import SafetensorError

from mm15.chat import ChatEncoder
from mm15.data.mixture import MixtureSampler
from mm15.hardware import compute_dtype, fast_dtype, matmul_rate
from mm15.image import ImageProcessor
from mm15.model.mm15 import MM15Model
from mm15.paths import check_output_dir, shown, write_text_atomic
from mm15.train import distributed as D
from mm15.train.checkpoint import (
    CorruptCheckpointError,
    checkpoint_step,
    complete_checkpoints,
    export_final,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_extra,
    save_checkpoint,
    step_dir_name,
)
from mm15.train.config import RecipeConfig, StageConfig
from mm15.train.data import MAX_SKIP_EXAMPLES, Prefetcher, PrefetchMode, SampleSource, TrainStream
from mm15.train.trainer import MODULES, NonFiniteLoss, build_optimizer, train_step

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def can_fork_workers() -> bool:
    """Whether a data worker may be forked: on Linux; macOS's system libraries are not fork-safe."""
    return sys.platform.startswith("linux")


def prefetch_mode(setting: str) -> PrefetchMode:
    """``data.prefetch`` as a ``Prefetcher`` mode: ``auto`` is ``process`` where processes can be forked
    (Linux), else ``inline``. Measured on 2 cores (docs/training.md): with torch's threads on both, the
    worker process trains as fast as inline preparation, eager or compiled, and the step waits for data
    2% of its time instead of 13-20%; with a core to spare it is 1.16x faster than the background
    thread, whose data work holds the GIL the training loop needs."""
    if setting == "auto":
        return "process" if can_fork_workers() else "inline"
    if setting not in ("inline", "thread", "process"):
        raise ValueError(f"data.prefetch must be auto, inline, thread or process, got {setting!r}")
    return setting  # type: ignore[return-value]


def stage_dtype(setting: str) -> torch.dtype:
    """A stage's ``autocast`` setting as a dtype: ``auto`` is this machine's ``fast_dtype()``."""
    return fast_dtype() if setting == "auto" else DTYPES[setting]


# Per-step metrics written to TensorBoard as scalars (besides per-source losses and MoE aux losses).
LOGGED_SCALARS = ("loss", "lr", "tokens_per_s", "images_per_s", "mfu", "data_wait", "peak_rss_gib")


# The file whose lock marks a run directory as being written (``run_dir_lock``).
LOCK_NAME = ".lock"
# Beside a stage's exported model: the settings it was trained with (a later run compares the recipe).
STAGE_RECORD = "mm15_stage.json"


class StageFailed(RuntimeError):
    """A stage stopped (non-finite loss, unusable data); its last good checkpoint is kept."""


class StopRequested(Exception):
    """SIGTERM or Ctrl+C stopped the run between two steps, after a checkpoint of the last one."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """While active, SIGTERM or a first Ctrl+C (SIGINT) asks the run to stop after the current step.

    Why: a cluster scheduler preempts a job with SIGTERM (torchrun passes it on to every rank) and kills
    it some seconds later, and a person stops a run with Ctrl+C; either way a run that stopped where it
    was would lose every step since its last ``save_every`` checkpoint. With this, the step finishes, a
    checkpoint of it is written and the run ends with ``StopRequested``; ``--resume`` continues exactly.
    A second signal interrupts at once (``KeyboardInterrupt``, no checkpoint), for a step that takes too
    long. Every rank must call ``agreed()`` at the same point: a signal on one rank stops them all there.

    Handlers are installed only on the main thread (Python delivers signals there alone), never over a
    signal the process ignores (a shell's background job ignores SIGINT), and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, console: Console) -> None:
        self.signum: int | None = None
        self._console = console
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self._console.print(
            f"[yellow]{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
            "(a second Ctrl+C or SIGTERM stops at once, without one)[/yellow]",
            soft_wrap=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def agreed(self) -> int | None:
        """The signal received, by this rank or any other (a collective under torchrun), else None."""
        return D.max_across_ranks(self.signum or 0) or None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stage_seed(seed: int, stage: str) -> int:
    """The seed a stage after the first starts from: the recipe's, mixed with the stage's name."""
    return (seed + zlib.crc32(stage.encode())) % 2**63


def _model_for(
    recipe: RecipeConfig,
    stage: StageConfig,
    run_dir: Path,
    previous: MM15Model | None,
    previous_stage: str | None,
) -> MM15Model:
    """The model ``stage`` starts from: built (parent ``init``), the one ``previous_stage`` left in
    memory when that stage is the parent, or loaded from the parent stage's export or directory.

    Every stage starts from the same random state however the run got there (in one process with the
    stages before it, or from ``--resume`` after them): ``init`` from the recipe's seed before the
    model is built, the others from ``_stage_seed``. A stage resumed from a checkpoint then restores
    the checkpoint's state instead.
    """
    in_recipe = stage.parent in {s.name for s in recipe.stages}
    if stage.parent == "init":
        _seed_everything(recipe.seed)
        model = MM15Model.build(recipe.model.build())
    elif previous is not None and stage.parent == previous_stage:
        model = previous
    else:
        parent_dir = run_dir / stage.parent / "final" if in_recipe else Path(stage.parent).expanduser()
        if not parent_dir.is_dir():
            hint = (
                f"; train it first (--stage {stage.parent}) or run the recipe without --stage"
                if in_recipe
                else ""
            )
            raise StageFailed(
                f"stage {stage.name!r}: its parent {stage.parent!r} has no model at {parent_dir}{hint}"
            )
        model = MM15Model.from_pretrained(parent_dir)
    if stage.parent != "init":
        _seed_everything(_stage_seed(recipe.seed, stage.name))
    # The stage's image settings (e.g. splitting on for the OCR stage) apply to this stage's data: over
    # the recipe's model preset for a model of this recipe, over its own plan for a model from elsewhere
    # (whose encoder may take another tile size than the preset's).
    if stage.parent == "init" or in_recipe:
        image = recipe.image_plan(stage.name)
    else:
        image = stage.image.apply(model.cfg.image)
    model.cfg = dataclasses.replace(model.cfg, image=image)
    return model


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity) replaced by ``None``, in nested dicts and lists.

    The standard library writes NaN as ``NaN``, which is not JSON: strict readers (``jq``, JavaScript)
    refuse the whole file. A step's record holds such values when its loss or gradient was not finite
    (a step skipped under ``nan_policy: skip``, which its ``skipped`` field says).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_line(record: Any) -> str:
    """One line of strict JSON (non-finite numbers as ``null``): ``metrics.jsonl`` and ``eval.jsonl``."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def _number(value: float | None) -> float:
    """A logged value as a float: ``None`` (a non-finite value in strict JSON) is NaN."""
    return math.nan if value is None else float(value)


def _plot(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    # Markers as well as lines: a line through one point draws nothing (a 1-step stage, a source present
    # at one step only). A non-finite value (null in metrics.jsonl) is a gap.
    losses = [_number(h["loss"]) for h in history]
    ax.plot(steps, losses, label="total", color="black", linewidth=2, marker="o", markersize=3)
    for source in sorted({s for h in history for s in h["source_loss"]}):
        points = [
            (h["step"], _number(h["source_loss"][source])) for h in history if source in h["source_loss"]
        ]
        ax.plot(*zip(*points, strict=True), label=source, alpha=0.6, linewidth=1, marker=".", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per supervised token)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve_strategy(requested: str, world_size: int) -> str:
    """``auto`` is DDP with several ranks and nothing with one; a parallel strategy needs ``torchrun``."""
    if requested == "auto":
        return "ddp" if world_size > 1 else "none"
    if requested not in D.STRATEGIES:
        raise ValueError(f"unknown strategy {requested!r}; choose from {('auto', *D.STRATEGIES)}")
    if requested != "none" and world_size == 1:
        raise ValueError(
            f"strategy {requested!r} needs several ranks: launch with torchrun --nproc_per_node N"
        )
    return requested


def speed_options(model: MM15Model, *, compile: bool = False, grad_checkpointing: bool = False) -> None:
    """A stage's ``grad_checkpointing`` and ``compile`` switches, applied before any wrapping.

    Gradient checkpointing recomputes each LLM decoder layer and vision block in backward instead of
    storing its activations (Hugging Face's non-reentrant implementation). ``compile`` compiles each
    decoder layer and vision block on its own (torchtitan's per-block scheme): repeated blocks share one
    compiled graph, and the varying sequence lengths of packed batches become dynamic shapes after the
    first recompilation instead of recompiling the whole model for every new length.

    Both apply either way: a model reused from the previous stage of the run (``_model_for``) arrives
    with that stage's settings, and a stage with ``grad_checkpointing: false`` or ``compile: false``
    turns them off again.
    """
    kwargs = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    for part in (model.llm, model.vision.model):
        part.activation_checkpointing_disable()
        # Enabling also hooks the LLM's input embeddings (their output requires grad, for checkpointed
        # layers); disabling leaves that hook, and enabling twice would add a second one.
        part.disable_input_require_grads()
        if grad_checkpointing:
            part.activation_checkpointing_enable(**kwargs)
    # Per-sample attention stays on: it runs between the compiled graphs (mm15.model.attention).
    for block in [*model.llm.get_decoder().layers, *D.vision_blocks(model)]:
        # ``Module.compile`` compiles in place: the compiled call goes to ``_compiled_call_impl`` and the
        # module (its parameters, its state dict) stays as it was; without it the module runs eager.
        if not compile:
            block._compiled_call_impl = None
        elif getattr(block, "_compiled_call_impl", None) is None:
            block.compile()


def evaluate_during_training(model: MM15Model, stage: StageConfig, step: int) -> dict[str, float]:
    """The stage's ``eval_tasks`` on ``eval_limit`` items each: flat ``task/...`` and ``category/...`` scores.

    Greedy decoding draws no random numbers, and the RNG state is restored anyway, so evaluating does
    not change the training run (resume stays exact). Generation runs in the stage's compute dtype.
    """
    from mm15.eval.runner import evaluate

    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), compute_dtype(stage_dtype(stage.autocast)):
            report = evaluate(
                model,
                stage.eval_tasks,
                limit=stage.eval_limit,
                progress=False,
                model_id=f"{stage.name}@{step}",
            )
    finally:
        model.train(was_training)
    return report.scores()


def _data_state(extra: dict[str, Any], rank: int, world_size: int, console: Console) -> dict[str, Any] | None:
    """This rank's data position from a checkpoint (``None``: start the data afresh, with a warning)."""
    saved = extra["data"]
    ranks = saved["ranks"] if isinstance(saved, dict) and "ranks" in saved else [saved]
    if len(ranks) == world_size:
        return ranks[rank]
    console.print(
        f"[yellow]warning:[/yellow] the checkpoint was written by {len(ranks)} rank(s), this run has "
        f"{world_size}: the model and optimizer resume exactly, the data streams restart per rank"
    )
    return None


class StageLog:
    """Rank 0's record of a stage: ``metrics.jsonl``, ``eval.jsonl`` and TensorBoard; inert elsewhere.

    On resume both files are rewritten from the checkpoint's history first, so a resumed run's logs hold
    no step twice, and TensorBoard drops what was logged after the checkpoint (``purge_step``).
    """

    def __init__(
        self,
        stage_dir: Path,
        stage: str,
        history: list[dict[str, Any]],
        evals: list[dict[str, Any]],
        start: int,
        active: bool,
    ) -> None:
        self.stage = stage
        self.metrics_file = stage_dir / "metrics.jsonl"
        self.eval_file = stage_dir / "eval.jsonl"
        self.writer: Any = None  # set on the active rank only
        if not active:
            return
        self.metrics_file.write_text("".join(json_line(h) for h in history))
        self.eval_file.write_text("".join(json_line(e) for e in evals))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(stage_dir / "tensorboard"), purge_step=start)

    def step(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        with self.metrics_file.open("a") as log:
            log.write(json_line(record))
        for key in LOGGED_SCALARS:
            self.writer.add_scalar(f"{self.stage}/{key}", _number(record[key]), step)
        self.writer.add_scalar(f"{self.stage}/skipped", float(bool(record.get("skipped"))), step)
        for source, value in record["source_loss"].items():
            self.writer.add_scalar(f"{self.stage}/loss/{source}", _number(value), step)
        for key, value in record["aux"].items():
            self.writer.add_scalar(f"{self.stage}/moe/{key}", _number(value), step)

    def evaluation(self, scores: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        with self.eval_file.open("a") as log:
            log.write(json_line(scores))
        for key, value in scores.items():
            if key.startswith("category/"):
                self.writer.add_scalar(f"{self.stage}/eval/{key[9:]}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _save_or_stop(
    ckpt_dir: Path,
    step: int,
    stage: StageConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
) -> None:
    """``save_checkpoint``; a write that fails (a full disk, a lost mount) stops the stage cleanly."""
    try:
        save_checkpoint(ckpt_dir, step, model, optimizer, scheduler, extra, keep_last=stage.keep_last)
    except (OSError, SafetensorError) as err:  # the previous checkpoint is intact: saves are atomic
        # (safetensors reports a full disk as its own SafetensorError, not an OSError)
        raise StageFailed(
            f"stage {stage.name!r}: cannot write the checkpoint of step {step} ({err}); the last complete "
            f"one is {latest_checkpoint(ckpt_dir)}; fix that and continue with --resume"
        ) from None


def stage_settings(stage: StageConfig) -> dict[str, Any]:
    """The stage's settings as plain JSON data (tuples as lists), as a checkpoint records them."""
    return json.loads(json.dumps(dataclasses.asdict(stage), default=str))


def _changed_settings(then: Any, now: Any, path: str = "") -> list[str]:
    """``"field: old -> new"`` for every setting that differs between two ``stage_settings`` (none when
    ``then`` is None: a checkpoint from before stages were recorded)."""
    if then is None and not path:
        return []
    if isinstance(then, dict) and isinstance(now, dict):
        return [
            change
            for key in sorted(then.keys() | now.keys())
            for change in _changed_settings(
                then.get(key, "(unset)"), now.get(key, "(unset)"), f"{path}.{key}" if path else key
            )
        ]
    return [] if then == now else [f"{path}: {then!r} -> {now!r}"]


def resume_setting_changes(saved: dict[str, Any] | None, stage: StageConfig) -> list[str]:
    """The stage's settings that differ from a checkpoint's record (none for older checkpoints).

    Source specs are left out: where the data lives may change (a moved folder resumes exactly), and
    what it holds is checked by the stream's own fingerprints (``TrainStream.load_state_dict``); so is
    the prefetch mode, under which every mode gives the same micro-batches.
    """
    changes = _changed_settings(saved, stage_settings(stage))
    # The prefetch mode only moves the data work between processes: every mode resumes exactly.
    ignored = ("data.sources", "data.prefetch")
    return [change for change in changes if not change.startswith(ignored)]


def _check_same_trainable(checkpoint: Path, stage: StageConfig, ckpt_dir: Path) -> None:
    """The optimizer state of other trainable modules cannot be continued: say which list changed (the
    loader could only report mismatched parameter-group counts)."""
    saved = (read_checkpoint_extra(checkpoint).get("stage") or {}).get("trainable")
    if saved is not None and list(saved) != list(stage.trainable):
        raise ValueError(
            f"{checkpoint}: stage {stage.name!r} was trained with trainable: {list(saved)}, the recipe now "
            f"says {list(stage.trainable)}; resume with the list it was written with, or move {ckpt_dir} "
            "away to start the stage over"
        )


def _check_same_optimizer(saved: dict[str, Any] | None, stage: StageConfig, checkpoint: Path) -> None:
    """An optimizer's state (AdamW's moments, Adafactor's factored ones) cannot continue another's."""
    then = ((saved or {}).get("optimizer") or {}).get("name")
    if then is not None and then != stage.optimizer.name:
        raise ValueError(
            f"{checkpoint}: written with optimizer {then}, the recipe's stage {stage.name!r} now uses "
            f"{stage.optimizer.name}, whose state cannot continue it; resume with {then}, or move "
            f"{checkpoint.parent} away to start the stage over"
        )


def _restore_recipe_hyperparameters(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    recipe_groups: list[dict[str, Any]],
    stage: StageConfig,
    step: int,
) -> None:
    """After a resume, the hyperparameters the recipe built the optimizer with, not the checkpoint's.

    Loading an optimizer's state restores its groups' hyperparameters (lr, weight decay, betas, eps) as
    they were saved; a recipe changed since (its lr, its schedule's length) would be ignored, although
    the run says it goes on with the recipe as it is now. ``recipe_groups`` are the groups as
    ``build_optimizer`` and the scheduler set them, taken before loading. With an unchanged recipe the
    values are the ones loaded, bit for bit: the learning rate is the product ``LambdaLR`` computes.
    """
    for group, built in zip(optimizer.param_groups, recipe_groups, strict=True):
        group.update(built)
        group["lr"] = group["initial_lr"] * stage.schedule.factor(step, stage.max_steps)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


def _load_newest_readable(
    ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, console: Console
) -> tuple[Path, int, dict[str, Any]] | None:
    """Load the newest checkpoint whose files read: (its path, step, extra state), or None if there is none.

    A checkpoint damaged after it was written (``CorruptCheckpointError``) is reported and the one before
    it tried; one that does not fit the model stops the run, as every older one would not fit either.
    """
    candidates = complete_checkpoints(ckpt_dir)
    for path in reversed(candidates):
        try:
            step, extra = load_checkpoint(path, model, optimizer, scheduler)
        except CorruptCheckpointError as err:
            console.print(f"[yellow]skipping an unreadable checkpoint: {shown(err)}[/yellow]", soft_wrap=True)
            continue
        return path, step, extra
    if candidates:
        raise ValueError(
            f"none of the {len(candidates)} checkpoints in {ckpt_dir} can be read; move them away to "
            "start the stage over"
        )
    return None


def run_stage(
    recipe: RecipeConfig,
    stage: StageConfig,
    run_dir: Path,
    model: MM15Model,
    console: Console,
    resume: bool,
    strategy: str = "none",
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Train one stage; every rank calls it, only rank 0 writes logs, plots and the final model.

    With ``stop``, a signal it caught ends the stage after the current step with a checkpoint of that
    step (``StopRequested``); a signal during the last step lets the stage finish.
    """
    rank, world = D.rank(), D.world_size()
    main = rank == 0
    stage_dir = run_dir / stage.name
    ckpt_dir = stage_dir / "checkpoints"
    stage_dir.mkdir(parents=True, exist_ok=True)
    dtype = stage_dtype(stage.autocast)
    accum = stage.grad_accum(world_size=world)
    encoder = ChatEncoder(model.tokenizer, model.cfg.image, max_length=stage.data.seq_length)
    # uint8 tiles: the encoder normalises them (a quarter of the memory in the prefetch queue).
    images = ImageProcessor(
        model.cfg.image, model.vision.image_mean, model.vision.image_std, dtype=torch.uint8
    )
    sampler = MixtureSampler(stage.data.mixture_node(), seed=recipe.seed, rank=rank, world_size=world)
    stream = TrainStream(
        sampler,
        stage.data.resolve_sources(),
        encoder,
        images,
        samples_per_micro=stage.micro_batch,
        pad_id=model.tokenizer.pad_token_id,
        packed=stage.data.packing,
        max_corrupt_fraction=stage.max_corrupt_fraction,
        seed=recipe.seed,
        balanced=stage.data.sampling == "balanced",
        shuffle_buffer=stage.data.shuffle_buffer,
        over_budget=stage.data.over_budget,
    )
    speed_options(model, compile=stage.compile, grad_checkpointing=stage.grad_checkpointing)
    wrapped = D.wrap_model(model, strategy, trainable=stage.trainable)
    lrs = {m: stage.optimizer.lr_for(m) for m in MODULES}
    optimizer = build_optimizer(
        model,
        stage.trainable,
        lrs,
        stage.optimizer.name,
        stage.optimizer.weight_decay,
        tuple(stage.optimizer.betas),
        stage.optimizer.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: stage.schedule.factor(s, stage.max_steps)
    )
    recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    start, history, evals = 0, [], []
    if resume and (newest := latest_checkpoint(ckpt_dir)) is not None:
        _check_same_trainable(newest, stage, ckpt_dir)
    resumed = _load_newest_readable(ckpt_dir, model, optimizer, scheduler, console) if resume else None
    if resumed is not None:
        latest, start, extra = resumed
        state = _data_state(extra, rank, world, console)
        if state is not None:
            try:
                changes = stream.load_state_dict(state)
            except (ValueError, KeyError) as err:
                raise ValueError(
                    f"{latest}: the stage's data has changed since this checkpoint ({err}); resume with the "
                    f"recipe it was written with, or move {ckpt_dir} away to start the stage over"
                ) from None
            for change in changes:
                console.print(f"[yellow]warning:[/yellow] {shown(change)}", soft_wrap=True)
        _check_same_optimizer(extra.get("stage"), stage, latest)
        if start > stage.max_steps:  # range(start, max_steps) would be empty and the stage "done"
            raise ValueError(
                f"{latest} is at step {start}, past the stage's max_steps {stage.max_steps}: resume without "
                f"a smaller --max-steps, or move {ckpt_dir} away to start the stage over"
            )
        _restore_recipe_hyperparameters(optimizer, scheduler, recipe_groups, stage, start)
        history = json_safe(extra["history"])  # NaN in checkpoints from before strict JSON
        evals = extra.get("evals", [])
        console.print(f"[bold]{shown(stage.name)}[/bold]: resumed from {shown(latest)} at step {start}")
        changed = resume_setting_changes(extra.get("stage"), stage)
        if changed:
            console.print(
                f"[yellow]warning:[/yellow] stage {shown(repr(stage.name))} has changed since "
                f"{shown(latest.name)}: {shown('; '.join(changed))}. The run goes on with the recipe as "
                "it is now (a learning-rate schedule follows the new max_steps and warm-up from this "
                "step on), so it no longer repeats an uninterrupted run.",
                soft_wrap=True,
            )
    # The MFU denominator, measured once per stage, before the data worker starts: its work on the
    # other core made the rate 33% low (and MFU 1.5x high) when measured after.
    peak = matmul_rate(dtype)
    data = Prefetcher(stream, mode=prefetch_mode(stage.data.prefetch))
    # Evaluation runs on rank 0 with the replicated model; a sharded (FSDP2) model would need every rank.
    evaluating = stage.eval_every > 0 and strategy != "fsdp2"
    if stage.eval_every > 0 and not evaluating:
        console.print(f"[yellow]{shown(stage.name)}: eval_every is ignored under FSDP2[/yellow]")
    log = StageLog(stage_dir, stage.name, history, evals, start, active=main)
    # Replicated models must give every trainable parameter a gradient on every rank (an MoE expert no
    # token reached, the encoder on a text-only batch); see touch_unused_branches.
    loss_hook = partial(D.touch_unused_branches, wrapped) if strategy == "ddp" else None
    wrapped.train()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),  # from the recent steps' pace: long stages need it more than short ones
        TextColumn("{task.fields[info]}"),
    )
    progress = Progress(*columns, console=console, disable=not main)

    def save(done: int) -> None:
        # Every rank's data position, so that a resume on the same world size is exact.
        extra = {
            "data": {"ranks": D.gather_objects(data.state_dict())},
            "history": history,
            "evals": evals,
            "stage": stage_settings(stage),
        }
        _save_or_stop(ckpt_dir, done, stage, model, optimizer, scheduler, extra)

    task = progress.add_task(f"{stage.name}", total=stage.max_steps, completed=start, info="")
    try:
        progress.start()
        for step in range(start, stage.max_steps):
            try:
                metrics = train_step(
                    wrapped,
                    data,
                    optimizer,
                    scheduler,
                    accum,
                    step,
                    dtype,
                    stage.max_grad_norm,
                    peak,
                    loss_hook=loss_hook,
                    nan_policy=stage.nan_policy,
                    loss_weighting=stage.loss_weighting,
                )
            except NonFiniteLoss as err:
                kept = latest_checkpoint(ckpt_dir)
                if kept is None:
                    where = (
                        "there is no checkpoint of this stage yet, so a rerun (with or without --resume) "
                        "trains it from step 0"
                    )
                else:
                    where = f"the last good checkpoint is {kept}, which --resume continues from"
                raise StageFailed(f"stage {stage.name!r}: {err}; {where}") from None
            # As metrics.jsonl and the checkpoint hold it: strict JSON, a non-finite value as None.
            record = json_safe(metrics.as_dict())
            history.append(record)
            try:
                log.step(record, step)
            except OSError as err:  # a full disk or a lost mount: name the file and where to resume
                raise StageFailed(
                    f"stage {stage.name!r}: cannot write the logs of step {step + 1} ({err}); the last "
                    f"complete checkpoint is {latest_checkpoint(ckpt_dir)}; fix that and continue with "
                    "--resume"
                ) from None
            skip_note = " (skipped)" if metrics.skipped else ""
            info = (
                f"loss {metrics.loss:.3f}{skip_note}  {metrics.tokens_per_s:.0f} tok/s  "
                f"wait {metrics.data_wait:.0%}"
            )
            progress.update(task, advance=1, info=info)
            done = step + 1
            if evaluating and main and (done % stage.eval_every == 0 or done == stage.max_steps):
                progress.update(task, info=f"loss {metrics.loss:.3f}  evaluating ...")
                scores = {"step": done, **evaluate_during_training(model, stage, done)}
                evals.append(scores)
                log.evaluation(scores, done)
            saved = done % stage.save_every == 0 or done == stage.max_steps
            if saved:
                save(done)
            signum = stop.agreed() if stop is not None else None
            if signum is not None and done < stage.max_steps:
                if not saved:
                    save(done)
                raise StopRequested(
                    signum,
                    f"stopped on {signal.Signals(signum).name} after step {done} of {stage.max_steps} of "
                    f"stage {stage.name!r}, with a checkpoint of that step "
                    f"({ckpt_dir / step_dir_name(done)})",
                )
    finally:
        # Also on an error or Ctrl+C: the data worker and the TensorBoard writer never outlive the stage.
        progress.stop()
        data.close()
        log.close()
    try:
        export_final(model, stage_dir / "final", files={STAGE_RECORD: json.dumps(stage_settings(stage))})
    except (OSError, SafetensorError) as err:  # a full disk: the last checkpoint holds the trained model
        raise StageFailed(
            f"stage {stage.name!r}: cannot export the final model to {stage_dir / 'final'} ({err}); the last "
            f"complete checkpoint is {latest_checkpoint(ckpt_dir)}; fix that and continue with --resume"
        ) from None
    skipped: Counter[str] = Counter()
    for counts in D.gather_objects(dict(data.skipped)):
        skipped.update(counts)
    skipped_sources: Counter[str] = Counter()
    for counts in D.gather_objects(dict(data.skipped_sources)):
        skipped_sources.update(counts)
    skip_examples = [e for rank_examples in D.gather_objects(data.skip_examples) for e in rank_examples]
    used: Counter[str] = Counter()
    for counts in D.gather_objects(dict(data.used)):
        used.update(counts)
    # Counted in the history, which a resume restores from the checkpoint: the steps skipped before an
    # interruption count too, and a step repeated after it counts once.
    skipped_steps = sum(1 for h in history if h.get("skipped"))
    if skipped_steps:
        skipped["nonfinite_steps"] = skipped_steps
    if main:
        _plot(history, stage_dir / "loss.png", f"{recipe.name}: {stage.name}")
    finite = [h for h in history if not h.get("skipped")] or history
    tail = finite[-max(1, len(finite) // 10) :]
    return {
        "stage": stage.name,
        "steps": len(history),
        "first_loss": _number(finite[0]["loss"]),
        "last_loss": sum(_number(h["loss"]) for h in tail) / len(tail),
        "tokens_per_s": sum(h["tokens_per_s"] for h in history) / len(history),
        "data_wait": sum(h["data_wait"] for h in history) / len(history),
        "skipped": dict(skipped),
        "skip_examples": skip_examples[:MAX_SKIP_EXAMPLES],
        # The samples of the handed-out micro-batches of every rank (not the producer's, nor the skipped
        # draws).
        "mixture": data.mixture_of(used),
        "skipped_sources": dict(skipped_sources),
        "world_size": world,
        "strategy": strategy,
        "eval": evals[-1] if evals else None,
    }


def _check_sources(stage: StageConfig) -> None:
    """Open each of the stage's data sources: a missing folder or file, a folder without shards, or a
    source without a single sample (the first shard sample is read, a video file's records listed) is
    an error naming the stage and source."""
    for name, spec in stage.data.resolve_sources().items():
        try:
            SampleSource(spec).check_not_empty()
        except (ValueError, OSError) as err:  # SourceError is a ValueError
            raise ValueError(f"stage {stage.name!r}, data source {name!r} ({spec}): {err}") from None


def _finished_setting_changes(run_dir: Path, stage: StageConfig) -> list[str]:
    """The settings a finished stage's export was trained with that differ from the recipe's now (none
    for an export from before they were recorded, or a record that cannot be read)."""
    record = run_dir / stage.name / "final" / STAGE_RECORD
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    return resume_setting_changes(saved if isinstance(saved, dict) else None, stage)


def _stage_done(run_dir: Path, stage: StageConfig) -> bool:
    """Whether the stage has exported its final model (a run skips it)."""
    return (run_dir / stage.name / "final" / "config.json").is_file()


def _check_before_training(
    recipe: RecipeConfig, stages: list[StageConfig], run_dir: Path, world_size: int, strategy: str
) -> None:
    """What the recipe could not check alone, for every stage before the first one trains: a later
    stage's mistake should not surface hours into the run. ``ValueError`` names the stage."""
    from mm15.eval.tasks import resolve_task_specs

    stage_names = {s.name for s in recipe.stages}
    for stage in stages:
        stage.grad_accum(world_size=world_size)
        if strategy == "fsdp2" and stage.optimizer.name == "adafactor":
            # torch's Adafactor reduces its factored statistics over a dimension FSDP2 shards.
            raise ValueError(
                f"stage {stage.name!r}: optimizer adafactor does not support FSDP2 sharded parameters "
                "in torch; use adamw for this stage or --strategy ddp"
            )
        if _stage_done(run_dir, stage):
            continue
        _check_sources(stage)
        if stage.eval_every > 0:
            resolve_task_specs(stage.eval_tasks)  # the files its evaluation tasks read
        # A parent stage that this run does not train (--stage) must have been trained already.
        running = {s.name for s in stages}
        if stage.parent in stage_names - running and not _stage_done(run_dir, recipe.stage(stage.parent)):
            raise ValueError(
                f"stage {stage.name!r}: its parent {stage.parent!r} has no model at "
                f"{run_dir / stage.parent / 'final'}; train it first (--stage {stage.parent}) or run the "
                "recipe without --stage"
            )
        # A parent given as a model directory (not init, not a stage of this recipe) must hold a model.
        parent = Path(stage.parent).expanduser()
        if stage.parent not in {"init", *stage_names} and not (parent / "config.json").is_file():
            raise ValueError(
                f"stage {stage.name!r}: its parent {stage.parent!r} has no model (no config.json in {parent})"
            )


def _checked_plan(
    recipe: RecipeConfig, stage_name: str | None, out: Path | None, strategy: str | None, world_size: int
) -> tuple[str, Path, list[StageConfig]]:
    """(strategy, run directory, stages to consider) after every start-up check that writes nothing."""
    chosen = resolve_strategy(strategy or recipe.distributed, world_size)
    run_dir = Path(out) if out is not None else recipe.run_dir
    stages = [recipe.stage(stage_name)] if stage_name else list(recipe.stages)
    _check_before_training(recipe, stages, run_dir, world_size, chosen)
    check_output_dir(run_dir, "run directory")
    for stage in stages:
        check_output_dir(run_dir / stage.name, f"the directory of stage {stage.name!r}")
    return chosen, run_dir, stages


def check_recipe(
    recipe: RecipeConfig,
    stage_name: str | None = None,
    resume: bool = False,
    out: Path | None = None,
    strategy: str | None = None,
) -> list[dict[str, Any]]:
    """What ``run_recipe`` would do, without training: its start-up checks (which raise as they would),
    then one row per stage: what happens to it, its steps, batch, sequence length, lr and data sources.
    The world size is ``torchrun``'s (``WORLD_SIZE``), 1 outside it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _, run_dir, stages = _checked_plan(recipe, stage_name, out, strategy, world)
    if not resume:
        _refuse_to_restart_over_checkpoints(run_dir, stages)
    rows = []
    for stage in stages:
        latest = latest_checkpoint(run_dir / stage.name / "checkpoints")
        if _stage_done(run_dir, stage):
            action = "done already"
        elif resume and latest is not None:
            action = f"resume at step {checkpoint_step(latest)}"
        else:
            action = "train from step 0"
        rows.append(
            {
                "stage": stage.name,
                "parent": stage.parent,
                "action": action,
                "steps": stage.max_steps,
                "batch": f"{stage.global_batch} = {stage.micro_batch} x {stage.grad_accum(world)} x {world}",
                "seq_length": stage.data.seq_length,
                "lr": stage.optimizer.lr,
                "trainable": ", ".join(stage.trainable),
                "sources": ", ".join(f"{n}: {spec}" for n, spec in stage.data.resolve_sources().items()),
            }
        )
    return rows


def _refuse_to_restart_over_checkpoints(run_dir: Path, stages: list[StageConfig]) -> None:
    """A stage still to run that has an earlier run's checkpoints needs ``--resume`` (or to be moved away).

    Starting it afresh would write its new checkpoints among the old ones, and pruning to ``keep_last``
    would then delete whichever sort first: an interrupted day of training lost to a forgotten flag.
    """
    for stage in stages:
        if _stage_done(run_dir, stage):
            continue  # it will not run
        found = complete_checkpoints(run_dir / stage.name / "checkpoints")
        if found:
            raise ValueError(
                f"stage {stage.name!r} has checkpoints of an earlier run (the latest is {found[-1]}): add "
                f"--resume to continue it, or move {run_dir / stage.name} away to start the stage over"
            )


def run_recipe(
    recipe: RecipeConfig,
    console: Console,
    stage_name: str | None = None,
    resume: bool = False,
    out: Path | None = None,
    strategy: str | None = None,
) -> list[dict[str, Any]]:
    """Run the recipe's stages (or one stage) in order; returns one summary dict per stage run.

    Under ``torchrun`` every rank runs this: the process group is joined here, each rank trains on its
    own slice of the data, and only rank 0 prints, logs and writes files.
    """
    info = D.init_distributed()
    if not info.is_main:
        console = Console(quiet=True)
    chosen, run_dir, stages = _checked_plan(recipe, stage_name, out, strategy, info.world_size)
    if info.is_distributed:
        console.print(f"{info.world_size} ranks, strategy {chosen}")
    run_dir.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    # Rank 0 writes every file of the run; another training process writing the same directory would
    # prune its checkpoints and interleave its logs, so one run directory has one writer at a time.
    with run_dir_lock(run_dir) if info.is_main else contextlib.nullcontext(), StopSignals(console) as stop:
        if not resume:
            _refuse_to_restart_over_checkpoints(run_dir, stages)

        def stage_finished() -> None:  # written at once: a SIGKILL later must not lose the row
            if info.is_main:
                _write_summary(run_dir, recipe, summaries)

        try:
            _train_stages(recipe, stages, run_dir, console, resume, chosen, stop, summaries, stage_finished)
        finally:  # a stopped run keeps the summary of the stages it finished
            if summaries and info.is_main:
                _write_summary(run_dir, recipe, summaries)
    D.barrier()
    return summaries


def _train_stages(
    recipe: RecipeConfig,
    stages: list[StageConfig],
    run_dir: Path,
    console: Console,
    resume: bool,
    strategy: str,
    stop: StopSignals,
    summaries: list[dict[str, Any]],
    stage_finished: Callable[[], None],
) -> None:
    """``run_recipe``'s loop: each stage not done yet, in order; each stage's summary into ``summaries``
    (and ``stage_finished`` called after each)."""
    model: MM15Model | None = None  # the model the last stage trained in this process, and its stage
    model_stage: str | None = None
    for index, stage in enumerate(stages):
        if _stage_done(run_dir, stage):
            final = shown(run_dir / stage.name / "final")
            console.print(f"[bold]{shown(stage.name)}[/bold]: done already ({final})")
            changed = _finished_setting_changes(run_dir, stage)
            if changed:  # e.g. a quick --max-steps run, then the full recipe into the same directory
                console.print(
                    f"[yellow]warning:[/yellow] stage {shown(repr(stage.name))} finished with other settings "
                    f"than the recipe's now: {shown('; '.join(changed))}. Its model is used as it is; move "
                    f"{shown(run_dir / stage.name)} away to train it again.",
                    soft_wrap=True,
                )
            model = None
            continue
        if index and (signum := stop.agreed()) is not None:  # caught in the previous stage's last step
            raise StopRequested(
                signum,
                f"stopped on {signal.Signals(signum).name} after stage {stages[index - 1].name!r}, "
                f"before stage {stage.name!r}",
            )
        model = _model_for(recipe, stage, run_dir, model, model_stage)
        model_stage = stage.name
        summaries.append(run_stage(recipe, stage, run_dir, model, console, resume, strategy, stop))
        stage_finished()
        if strategy != "none":
            # A wrapped or sharded model is not reused: the next stage loads this stage's export.
            model = None


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an exclusive ``flock``) for the block; ``ValueError`` if another process does.

    The kernel releases the lock when its process ends, however it ends (SIGKILL included), so a killed
    run never leaves a stale lock behind for ``--resume`` to trip over.
    """
    path = run_dir / LOCK_NAME
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"{run_dir} is in use by another training process (pid {holder}); wait for it to finish, "
                "or choose another --out"
            ) from None
        except OSError as err:  # a file system without locks (some network mounts): train unguarded
            warnings.warn(f"cannot lock {path} ({err}); nothing stops a second run here", stacklevel=3)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _earlier_summaries(record: Path) -> list[dict[str, Any]]:
    """The stage rows an earlier call wrote to ``record``; none, with a warning naming it, if it cannot
    be read (a file from before these writes were atomic, cut by a kill, say): this run's rows are
    written anyway, and a finished stage's own files hold its figures."""
    if not record.is_file():
        return []
    try:
        rows = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "stage" in r for r in rows):
            raise ValueError("not a list of stage rows")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        warnings.warn(
            f"{record} cannot be read ({err}); it is rewritten with this run's stages only", stacklevel=2
        )
        return []
    return rows


def _write_summary(run_dir: Path, recipe: RecipeConfig, summaries: list[dict[str, Any]]) -> None:
    # Stages run in separate calls (--stage, or a resumed run) keep their rows: merge with summary.json.
    record = run_dir / "summary.json"
    by_stage = {s["stage"]: s for s in _earlier_summaries(record)}
    by_stage.update({s["stage"]: s for s in summaries})
    summaries = [by_stage[s.name] for s in recipe.stages if s.name in by_stage]
    write_text_atomic(record, json.dumps(json_safe(summaries), indent=1, default=str, allow_nan=False))
    lines = [
        f"# {recipe.name}: training summary",
        "",
        "| stage | steps | loss (first) | loss (last 10%) | tokens/s | data wait | skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['stage']} | {s['steps']} | {_number(s['first_loss']):.3f} | "
            f"{_number(s['last_loss']):.3f} | {s['tokens_per_s']:.0f} | {s['data_wait']:.1%} | "
            f"{s['skipped'] or 'none'} |"
        )
    evaluated = [s for s in summaries if s.get("eval")]
    if evaluated:
        categories = sorted({k[9:] for s in evaluated for k in s["eval"] if k.startswith("category/")})
        lines += [
            "",
            "Evaluation at the end of each stage (held-out items, eval_limit per task; mm15.eval):",
            "",
            "| stage | step | " + " | ".join(categories) + " |",
            "|---|---|" + "---|" * len(categories),
        ]
        for s in evaluated:
            cells = [f"{s['eval'].get(f'category/{c}', float('nan')):.1f}" for c in categories]
            lines.append(f"| {s['stage']} | {s['eval']['step']} | " + " | ".join(cells) + " |")
    by_source = [s for s in summaries if s.get("skipped_sources")]
    if by_source:
        lines += ["", "Skipped samples per source:", ""]
        lines += [
            f"- {s['stage']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["skipped_sources"].items()))
            for s in by_source
        ]
    named = [s for s in summaries if s.get("skip_examples")]
    if named:
        lines += ["", f"Skipped samples (the first {MAX_SKIP_EXAMPLES} per stage):", ""]
        lines += [f"- {s['stage']}: {example}" for s in named for example in s["skip_examples"]]
    lines += [
        "",
        "Loss curves: " + ", ".join(f"[{s['stage']}]({s['stage']}/loss.png)" for s in summaries),
        "",
    ]
    write_text_atomic(run_dir / "summary.md", "\n".join(lines))
