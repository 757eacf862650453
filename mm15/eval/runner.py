"""Run evaluation tasks on an ``MM15Model``: batched greedy generation, a resumable cache, the report.

``evaluate(model, tasks, limit=None, batch_size=8, out_dir=None, progress=True)`` takes an in-memory
model (a trained one from disk, or the one a training loop holds) and task specs (``"synth"``,
``"general,textvqa:path=..."``, see ``mm15.eval.tasks``), and returns an ``EvalReport``.

* **Prompts.** Each item's user turn (``Task.render``) goes through the model tokenizer's chat template
  with the generation prompt, exactly as ``mm15.demo`` asks; images are loaded in placeholder order.
* **Generation.** Items are generated ``batch_size`` at a time, left-padded (``mm15.model.generate``),
  under ``mm15.hardware.autocast()``, with each task's ``GenerationConfig`` (greedy by default), so the
  same settings give the same outputs. The model is put in eval mode and restored afterwards.
* **Cache.** With ``out_dir``, every generated output is appended at once to
  ``out_dir/cache/<task>.jsonl`` under a key hashing the model identity (config and weight hashes,
  and the compute dtype, since bf16 autocast rounds differently),
  the task's name, version and options, the item id, the prompt and the generation settings. A rerun
  (after an interruption, or with more tasks) takes what it finds there and generates the rest; change
  anything in the key and the item is generated again. Scores are always recomputed from the outputs.
* **Files.** With ``out_dir``, the report is saved there (``results.json``, ``results.md``,
  ``scores.png``; see ``mm15.eval.report``).

For evaluation during training, call it on a few items per task and log the flat scores::

    report = evaluate(model, "synth", limit=8, batch_size=8, progress=False)
    report.category_scores   # {"general": 41.7, "text-rich": ..., ...}
    report.scores()          # {"task/synth-chart-qa": ..., "category/general": ..., "mmbase": ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mm15.eval.report import EvalReport, TaskResult
from mm15.eval.tasks import Task, TaskError, TaskItem, TaskSpec, resolve_task_specs, skipped_counts
from mm15.hardware import autocast, fast_dtype
from mm15.image import ImageError, load_image
from mm15.model.generate import GenerationConfig, generate
from mm15.model.mm15 import MM15Model, MM15Processor
from mm15.paths import check_output_dir

__all__ = [
    "ItemCache",
    "chat_prompt",
    "evaluate",
    "generate_texts",
    "model_identity",
    "weights_fingerprint",
]

CACHE_DIR = "cache"


# --------------------------------------------------------------------------------------------------
# Model identity and prompts
# --------------------------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes), in name order.

    It tells a trained model from its parent and one training step from the next, so cached outputs
    are never reused for other weights. Hashing reads every byte once (about a second per GB).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(
    model: MM15Model, path: str | Path | None = None, model_id: str | None = None
) -> dict[str, Any]:
    """Name, path, config hash and weight hash; ``model_id`` (e.g. ``"run-a/step-1000"``) replaces the
    weight hash when the caller knows the weights already, to skip hashing a large model."""
    config = json.dumps(model.cfg.to_dict(), sort_keys=True, default=str)
    identity: dict[str, Any] = {
        "name": model.cfg.name,
        "path": str(path) if path is not None else None,
        "config_sha256": _sha256(config),
    }
    if model_id is not None:
        identity["id"] = model_id
    else:
        identity["weights_sha256"] = weights_fingerprint(model)
    return identity


def chat_prompt(tokenizer: Any, user_text: str) -> str:
    """``user_text`` as one user turn in the tokenizer's chat template, ready for the reply."""
    from mm15.chat import chat_template
    from mm15.model.mm15 import escape_special_tokens

    return tokenizer.apply_chat_template(
        [{"role": "user", "content": escape_special_tokens(user_text, tokenizer)}],
        tokenize=False,
        add_generation_prompt=True,
        chat_template=chat_template(tokenizer),
    )


# --------------------------------------------------------------------------------------------------
# The per-item cache
# --------------------------------------------------------------------------------------------------


class ItemCache:
    """Generated outputs by key, read from and appended to one JSONL file (or memory only).

    Each line is ``{"key", "id", "output"}``, written and flushed as soon as its batch is done, so an
    interrupted run loses at most the batch in flight. A damaged last line (a kill mid-write) is
    ignored.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.outputs: dict[str, str] = {}
        if path is not None and path.is_file():
            # Split the bytes at b"\n" only: an output may hold U+2028 or U+0085, which splitlines()
            # splits at, and a kill mid-write can cut the last line inside a UTF-8 character, which
            # must cost that line only, not the whole file.
            for line in path.read_bytes().split(b"\n"):
                try:
                    record = json.loads(line.decode("utf-8"))
                    key, output = record["key"], record["output"]
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    continue
                if isinstance(key, str) and isinstance(output, str):
                    self.outputs[key] = output

    def get(self, key: str) -> str | None:
        return self.outputs.get(key)

    def put(self, records: Iterable[tuple[str, str, str]]) -> None:
        """Store ``(key, item id, output)`` records."""
        lines = []
        for key, item_id, output in records:
            self.outputs[key] = output
            lines.append(json.dumps({"key": key, "id": item_id, "output": output}, ensure_ascii=False))
        if self.path is not None and lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # After a kill mid-write the file ends inside a line: end it, or the first new record
            # would be glued to it and lost.
            cut = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            with self.path.open("a", encoding="utf-8") as f:
                f.write("\n" * cut + "\n".join(lines) + "\n")
                f.flush()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".jsonl"


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(options.items())}


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    index: int
    item: TaskItem
    user_text: str
    prompt: str
    key: str


class _Progress:
    """A rich progress bar, or nothing."""

    def __init__(self, enabled: bool, console: Console | None) -> None:
        self.bar = (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            if enabled
            else None
        )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def add(self, name: str, total: int) -> int | None:
        return self.bar.add_task(name, total=total) if self.bar is not None else None

    def advance(self, handle: int | None, steps: int = 1) -> None:
        if self.bar is not None and handle is not None:
            self.bar.advance(handle, steps)  # type: ignore[arg-type]


def _video_processor(model: MM15Model) -> MM15Processor:
    """A processor whose plan never splits: MM1.5-Video feeds each frame as one unsplit image."""
    plan = dataclasses.replace(model.cfg.image, split=False)
    return MM15Processor(model.tokenizer, plan, model.vision.image_mean, model.vision.image_std)


def generate_texts(
    model: MM15Model,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    cfg: GenerationConfig,
    *,
    processor: MM15Processor | None = None,
    video: bool = False,
) -> list[str]:
    """One batch: chat-formatted ``prompts`` (with ``<image>`` placeholders) and their images ->
    generated texts, left-padded on the model's device under ``autocast``. ``video`` plans the images
    unsplit (frames). The lmms-eval adapter generates through here too."""
    if video:
        processor = _video_processor(model)
    processor = processor or MM15Processor.for_model(model)
    batch = processor(list(prompts), [list(row) for row in images], padding_side="left")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with autocast():
        return generate(model, batch, cfg)


def _item_images(item: TaskItem) -> list[Image.Image]:
    """The item's images; one that cannot be read stops the task naming the item (it cannot be scored)."""
    try:
        return [load_image(ref) for ref in item.images]
    except ImageError as err:
        raise TaskError(f"item {item.id}: {err} (every image of an item is needed to score it)") from None


def _generate_batch(
    model: MM15Model, processor: MM15Processor, pending: Sequence[_Pending], cfg: GenerationConfig
) -> list[str]:
    """Outputs for ``pending`` in order; items flagged ``meta["is_video"]`` are planned unsplit, so a
    mixed batch is generated as two."""
    videos = [bool(p.item.meta.get("is_video")) for p in pending]
    if any(videos) and not all(videos):
        outputs: dict[int, str] = {}
        for flag in (False, True):
            part = [k for k, v in enumerate(videos) if v == flag]
            texts = _generate_batch(model, processor, [pending[k] for k in part], cfg)
            outputs.update(zip(part, texts, strict=True))
        return [outputs[k] for k in range(len(pending))]
    images = [_item_images(p.item) for p in pending]
    prompts = [p.prompt for p in pending]
    return generate_texts(model, prompts, images, cfg, processor=processor, video=all(videos))


def _run_task(
    model: MM15Model,
    processor: MM15Processor,
    model_key: str,
    name: str,
    task: Task,
    options: dict[str, Any],
    limit: int | None,
    batch_size: int,
    cache: ItemCache,
    progress: _Progress,
    counts: dict[str, int],
) -> TaskResult:
    items = task.items(options)
    skipped = skipped_counts(items)
    if not items:
        where = f" in {options['path']}" if options.get("path") else ""
        left_out = f" (records skipped: {skipped})" if skipped else ""
        raise TaskError(f"task {name}: no items to evaluate{where}{left_out}; an empty task has no score")
    caps = [n for n in (limit, options.get("limit")) if n is not None]
    count = min([len(items), *caps])
    cfg = task.generation_for(options)
    generation = dataclasses.asdict(cfg)
    # limit, name and benchmark change no answer: not part of the cache key.
    key_options = _jsonable({k: v for k, v in options.items() if k not in ("limit", "name", "benchmark")})
    base_key = json.dumps(
        {
            "model": model_key,
            "task": task.name,
            "version": task.version,
            "options": key_options,
            "generation": generation,
        },
        sort_keys=True,
    )
    records: list[dict[str, Any] | None] = [None] * count
    kept: list[TaskItem | None] = [None] * count
    handle = progress.add(name, count)

    def finish(p: _Pending, output: str) -> None:
        prediction = task.parse(output, p.item)
        records[p.index] = {
            "id": p.item.id,
            "prompt": p.user_text,
            "answers": list(p.item.answers),
            "output": output,
            "prediction": prediction,
            "score": float(task.score(prediction, p.item)),
        }
        # The aggregate needs the items; keep them without their images (memory stays per batch).
        kept[p.index] = dataclasses.replace(p.item, images=())

    def flush(pending: list[_Pending]) -> None:
        try:
            outputs = _generate_batch(model, processor, pending, cfg)
        except TaskError as err:
            raise TaskError(f"task {name}: {err}") from None
        cache.put((p.key, p.item.id, out) for p, out in zip(pending, outputs, strict=True))
        counts["generated"] += len(pending)
        for p, out in zip(pending, outputs, strict=True):
            finish(p, out)
        progress.advance(handle, len(pending))
        pending.clear()

    pending: list[_Pending] = []
    for index in range(count):
        item = items[index]
        user_text = task.render(item)
        prompt = chat_prompt(model.tokenizer, user_text)
        key = _sha256(base_key + json.dumps({"item": item.id, "prompt": prompt}, sort_keys=True))
        p = _Pending(index, item, user_text, prompt, key)
        cached = cache.get(key)
        if cached is not None:
            counts["cached"] += 1
            finish(p, cached)
            progress.advance(handle)
            continue
        pending.append(p)
        if len(pending) == batch_size:
            flush(pending)
    if pending:
        flush(pending)

    done = [r for r in records if r is not None]
    task_items = [i for i in kept if i is not None]
    aggregate = task.aggregate([r["prediction"] for r in done], task_items, [r["score"] for r in done])
    score = aggregate.pop("score")
    return TaskResult(
        name=name,
        task=task.name,
        category=task.category,
        version=task.version,
        metric=task.metric,
        options=_jsonable(options),
        prompt_template=task.prompt,
        generation=generation,
        score=score,
        metrics=aggregate,
        items=done,
        skipped=skipped,
        benchmark=options.get("benchmark") or task.benchmark or name,
        split_mean=task.split_mean,
    )


def evaluate(
    model: MM15Model,
    tasks: str | Sequence[str | TaskSpec],
    limit: int | None = None,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    model_path: str | Path | None = None,
    model_id: str | None = None,
    console: Console | None = None,
) -> EvalReport:
    """Evaluate ``model`` on ``tasks`` and return the report (module docstring).

    ``tasks``: a spec string or a list of specs / ``TaskSpec``. ``limit`` caps every task's items (a
    task's own ``limit=`` option caps it too; the smaller wins). ``out_dir``: cache and result files
    (nothing is written without it). ``model_path`` is recorded in the report; ``model_id`` replaces
    the weight hash in the identity (see ``model_identity``). Bad specs raise ``TaskError`` before
    anything runs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        # A task scored on no items would show 0.00 as if measured and pull its category mean down.
        raise ValueError(f"limit must be >= 1, got {limit}")
    resolved = resolve_task_specs(tasks if isinstance(tasks, str) else list(tasks))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_output_dir(out, "the results directory")
    started, clock = datetime.now(UTC), time.perf_counter()
    identity = model_identity(model, model_path, model_id)
    # Answers depend on the compute dtype too (bf16 autocast rounds differently): part of the key.
    identity["compute_dtype"] = str(fast_dtype()).removeprefix("torch.")
    model_key = json.dumps({k: v for k, v in identity.items() if k not in ("path", "name")}, sort_keys=True)
    processor = MM15Processor.for_model(model)
    counts = {"generated": 0, "cached": 0}
    results = []
    was_training = model.training
    model.eval()
    try:
        with _Progress(progress, console) as bar:
            for name, task, options in resolved:
                cache = ItemCache(out / CACHE_DIR / _file_name(name) if out is not None else None)
                results.append(
                    _run_task(
                        model,
                        processor,
                        model_key,
                        name,
                        task,
                        options,
                        limit,
                        batch_size,
                        cache,
                        bar,
                        counts,
                    )
                )
    finally:
        model.train(was_training)
    report = EvalReport(
        model=identity,
        tasks=results,
        run={
            "started": started.isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - clock, 3),
            "generated_items": counts["generated"],
            "cached_items": counts["cached"],
            "batch_size": batch_size,
        },
    )
    if out is not None:
        report.save(out)
    return report


def iter_task_table() -> Iterator[tuple[str, str, str, str, str]]:
    """(name, category, metric, options, description) of every registered task, for ``--list``."""
    from mm15.eval.tasks import tasks as all_tasks

    for task in all_tasks():
        options = ", ".join(f"{o.name}{'*' if o.required else ''}" for o in task.options)
        yield task.name, task.category, task.metric, options, task.description
