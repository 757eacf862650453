"""The registry of evaluation tasks: what to ask, how to generate, how to read and score the answer.

A ``Task`` is a frozen description (prismatic-vlms style): name, MM1.5 category, version, prompt
template, generation settings, answer parser, metric and an *item source* that turns the task's
options into a sequence of ``TaskItem``. ``register_task`` adds one, ``get_task(name)`` finds one and
``task_names(category)`` lists them. Two families are registered here:

* **held-out synthetic tasks** (``synth-<generator>``), one per synthetic generator of the SFT
  categories, drawn from ``mm15.data.synth.generate(name, index, split="eval", seed)``. The eval split's
  seeds are hashed apart from the training split's (``sample_seed``), so no item is a training sample.
  They need no files and run anywhere (tests, the demo, evaluation during training).
* **real benchmarks** on the loaders of ``mm15.eval.loaders`` (TextVQA, DocVQA, InfoVQA, ChartQA,
  OCRBench, POPE, VQAv2, RefCOCO*, ScreenSpot, AI2D, ScienceQA, MMMU, SEED): they take the annotation
  file (``path=``) and the image folder (``images=``, default: the annotation file's folder) as options.

Options are written after the name: ``textvqa:path=/data/TextVQA_0.5.1_val.json,images=/data/img``
(see ``parse_task_specs``). Every task accepts ``limit=N`` (the first N items), ``max_new_tokens=N``
(override the generation budget), ``name=LABEL`` (the result's name, to run one task twice) and
``benchmark=NAME`` (the benchmark the result counts toward in its category score; ``Task.benchmark``).

Variant tasks (``video``, ``ui``) live in ``mm15.eval.variant_tasks``, written separately: the registry
imports that module, if it exists, on the first lookup (``VARIANT_MODULE``), and the module calls
``register_task`` at import time.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from mm15.data.sample import IMAGE_PLACEHOLDER, REGION_PATTERN, ImageRef, Sample
from mm15.eval import loaders, metrics
from mm15.image import image_size
from mm15.model.generate import GenerationConfig

__all__ = [
    "CATEGORIES",
    "COMMON_OPTIONS",
    "MMBASE_CATEGORIES",
    "SPLIT_MEANS",
    "VARIANT_MODULE",
    "ItemList",
    "LazyItems",
    "Task",
    "TaskError",
    "TaskItem",
    "TaskOption",
    "TaskSpec",
    "get_task",
    "parse_task_specs",
    "register_task",
    "resolve_task_specs",
    "skipped_counts",
    "synthetic_task",
    "task_names",
    "tasks",
]

# MM1.5's evaluation categories (mm15-spec.md section 7.1), then the variants' categories.
CATEGORIES: tuple[str, ...] = (
    "general",
    "text-rich",
    "knowledge",
    "refer-ground",
    "multi-image",
    "in-context",
    "video",
    "ui",
)
# MM1.5's "MMBase" score: the mean of these category averages.
MMBASE_CATEGORIES: tuple[str, ...] = ("general", "text-rich", "knowledge")
# Imported on the first registry lookup when it exists; it registers the video and UI tasks.
VARIANT_MODULE = "mm15.eval.variant_tasks"

# What the models are told for short answers; the wording MM1.5-style SFT data (LLaVA) uses.
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."


class TaskError(ValueError):
    """An unknown task or category, or a bad task option; the message lists what is accepted."""


# --------------------------------------------------------------------------------------------------
# Items, options and tasks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    """One question of a task, ready to prompt.

    ``question`` fills the template's ``{question}``; for synthetic items it already holds the
    ``<image>`` placeholders (where the sample put them) and its regions written as text. ``lead`` is
    put before the templated prompt: real benchmark items put their image placeholder there.
    ``fields`` fill the template's other fields (``{options}`` of multiple choice). ``images`` are in
    placeholder order (paths or PIL images). ``meta`` is what the scorer needs (boxes, sizes, types).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    images: tuple[ImageRef, ...] = ()
    lead: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


class LazyItems(Sequence[TaskItem]):
    """A sequence whose items are built on access (a synthetic image is rendered only when needed).
    ``skipped`` counts the records its source left out, by reason, as ``ItemList.skipped`` does."""

    def __init__(
        self, count: int, make: Callable[[int], TaskItem], skipped: Mapping[str, int] | None = None
    ) -> None:
        self._count = count
        self._make = make
        self.skipped: dict[str, int] = {k: int(v) for k, v in (skipped or {}).items() if v}

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> TaskItem: ...

    @overload
    def __getitem__(self, index: slice) -> list[TaskItem]: ...

    def __getitem__(self, index: int | slice) -> TaskItem | list[TaskItem]:
        if isinstance(index, slice):
            return [self._make(i) for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"item {index} out of range (the task has {self._count} items)")
        return self._make(index)


class ItemList(list[TaskItem]):
    """A task's items plus what its loader left out on purpose: ``skipped`` maps a reason
    (``"split"``, ``"no_image"``, ``"video"``, ...) to a record count. The runner reports it with the
    task's result, so a score says what it was computed on."""

    def __init__(self, items: Iterable[TaskItem] = (), skipped: Mapping[str, int] | None = None) -> None:
        super().__init__(items)
        self.skipped: dict[str, int] = {k: int(v) for k, v in (skipped or {}).items() if v}


def skipped_counts(items: Sequence[TaskItem]) -> dict[str, int]:
    """The records an item source left out, by reason (``ItemList.skipped``; empty for other sources)."""
    return dict(getattr(items, "skipped", None) or {})


@dataclass(frozen=True)
class TaskOption:
    """One ``key=value`` option a task accepts; ``kind`` converts the text (``str``, ``int``, ``float``,
    ``bool``, ``Path``)."""

    name: str
    kind: type
    help: str
    default: Any = None
    required: bool = False

    def convert(self, task: str, value: Any, check_files: bool = True) -> Any:
        converted = self._convert(task, value, check_files)
        if self.kind is int and not -(2**63) <= converted < 2**63:
            # Sizes, seeds and limits end up as C integers (a sequence's length, a generator's seed).
            raise TaskError(f"task {task}: option {self.name} must fit in 64 bits, got {converted}")
        return converted

    def _convert(self, task: str, value: Any, check_files: bool) -> Any:
        if not isinstance(value, str):
            # Options given from Python (TaskSpec) rather than a command line: check the type only.
            accepted: tuple[type, ...] = (int, float) if self.kind is float else (self.kind,)
            if isinstance(value, accepted) and (self.kind is bool or not isinstance(value, bool)):
                if self.kind is Path:
                    return self._path(task, value, check_files)
                return float(value) if self.kind is float else value
            raise TaskError(f"task {task}: option {self.name} must be {self.kind.__name__}, got {value!r}")
        if self.kind is bool:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise TaskError(f"task {task}: option {self.name} must be true or false, got {value!r}")
        try:
            converted = self.kind(value)
        except ValueError:
            raise TaskError(
                f"task {task}: option {self.name} must be {self.kind.__name__}, got {value!r}"
            ) from None
        return self._path(task, converted, check_files) if self.kind is Path else converted

    def _path(self, task: str, path: Path, check_files: bool) -> Path:
        """``path`` with ``~`` expanded (for the check and for the loaders alike), checked to exist.

        Every path option names input (an annotation file, an image folder): a missing one is found
        when the specs are resolved, before any task runs, not after the tasks listed before it.
        """
        path = path.expanduser()
        if check_files and not path.exists():
            raise TaskError(f"task {task}: option {self.name}={path}: no such file or folder")
        return path


# Options every task accepts; the runner reads them, sources never see them.
COMMON_OPTIONS: tuple[TaskOption, ...] = (
    TaskOption("limit", int, "evaluate only the first N items"),
    TaskOption("max_new_tokens", int, "override the task's generation budget"),
    TaskOption("name", str, "the result's name (to run one task twice with other options)"),
    TaskOption(
        "benchmark",
        str,
        "the benchmark the result counts toward in its category score (default: the task's); "
        "results of one benchmark are its splits",
    ),
)
# How the results of one benchmark (its splits) make the benchmark's score (Task.split_mean).
SPLIT_MEANS: tuple[str, ...] = ("items", "splits")

ItemSource = Callable[[Mapping[str, Any]], Sequence[TaskItem]]
AnswerParser = Callable[[str, TaskItem], str]
Scorer = Callable[[str, TaskItem], float]
# (predictions, items, per-item scores) -> metrics; must hold "score" (x100), the task's headline number.
# The runner never calls one with no items: an empty task stops the run (mm15.eval.runner).
Aggregator = Callable[[Sequence[str], Sequence[TaskItem], Sequence[float]], dict[str, float]]


def mean_score(
    predictions: Sequence[str], items: Sequence[TaskItem], scores: Sequence[float]
) -> dict[str, float]:
    """The default aggregate: the mean item score x100."""
    return {"score": 100.0 * sum(scores) / len(scores)}


@dataclass(frozen=True)
class Task:
    """One evaluation task (module docstring). ``prompt`` is a ``str.format`` template with
    ``{question}`` and the item's ``fields``; the prompt is ``item.lead + prompt.format(...)``, sent as
    the user turn of the model's chat template. Bump ``version`` whenever the items, the prompt, the
    parser or the metric change: cached outputs are keyed by it. ``check``, when set, is called with
    the resolved options and raises ``TaskError`` for a combination the options alone cannot express
    (``split=`` required for a file that holds every split).

    ``benchmark`` names the benchmark the task's results count toward: a category score is the
    unweighted mean over benchmarks, each benchmark's results (its splits, e.g. POPE's three files)
    first combined into one score by ``split_mean``: ``"items"``, the mean over the union of the
    splits' items (each split's score weighted by its item count: ChartQA's overall over human and
    augmented), or ``"splits"``, the unweighted mean of the split scores (POPE's F1 per split, RefCOCO's
    Acc@0.5 per split). ``None`` makes every result its own benchmark (tasks on a generic format whose
    files may be different benchmarks); the ``benchmark=`` option overrides it per result."""

    name: str
    category: str
    version: str
    description: str
    prompt: str
    generation: GenerationConfig
    parse: AnswerParser
    score: Scorer
    metric: str
    source: ItemSource
    options: tuple[TaskOption, ...] = ()
    aggregate: Aggregator = mean_score
    check: Callable[[Mapping[str, Any]], None] | None = None
    benchmark: str | None = None
    split_mean: str = "items"

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise TaskError(f"task {self.name}: unknown category {self.category!r}; choose from {CATEGORIES}")
        if self.split_mean not in SPLIT_MEANS:
            raise TaskError(
                f"task {self.name}: split_mean must be one of {SPLIT_MEANS}, got {self.split_mean!r}"
            )
        if not self.name or any(c in self.name for c in ":,= "):
            raise TaskError(f"task name {self.name!r} must be non-empty, without ':', ',', '=' or spaces")
        clash = {o.name for o in self.options} & {o.name for o in COMMON_OPTIONS}
        if clash:
            raise TaskError(f"task {self.name}: options {sorted(clash)} are common to every task")

    @property
    def needs_files(self) -> bool:
        """Whether the task has required options (a real benchmark's annotation file)."""
        return any(o.required for o in self.options)

    def resolve_options(self, given: Mapping[str, Any], check_files: bool = True) -> dict[str, Any]:
        """Checked and converted options, defaults filled in; an unknown or missing one raises TaskError."""
        accepted = {o.name: o for o in (*self.options, *COMMON_OPTIONS)}
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise TaskError(
                f"task {self.name}: unknown option(s) {', '.join(unknown)}; it accepts "
                + ", ".join(f"{o.name} ({o.help})" for o in accepted.values())
            )
        resolved: dict[str, Any] = {}
        for option in accepted.values():
            if option.name in given:
                resolved[option.name] = option.convert(self.name, given[option.name], check_files)
            elif option.required:
                raise TaskError(f"task {self.name}: option {option.name}=... is required ({option.help})")
            else:
                resolved[option.name] = option.default
        for key in ("limit", "max_new_tokens"):
            if resolved[key] is not None and resolved[key] < 1:
                raise TaskError(f"task {self.name}: {key} must be >= 1, got {resolved[key]}")
        if self.check is not None:
            # Here, so a bad combination stops the command with the other option errors, before any
            # model is loaded or task run.
            self.check(resolved)
        return resolved

    def generation_for(self, options: Mapping[str, Any]) -> GenerationConfig:
        """The generation settings with the ``max_new_tokens`` option applied."""
        if options.get("max_new_tokens"):
            return dataclasses.replace(self.generation, max_new_tokens=options["max_new_tokens"])
        return self.generation

    def items(self, options: Mapping[str, Any]) -> Sequence[TaskItem]:
        """The task's items for resolved ``options`` (the common options removed)."""
        common = {o.name for o in COMMON_OPTIONS}
        return self.source({k: v for k, v in options.items() if k not in common})

    def render(self, item: TaskItem) -> str:
        """The user turn for ``item``: its lead, then the template filled in."""
        return item.lead + self.prompt.format_map({"question": item.question, **item.fields})


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------

_TASKS: dict[str, Task] = {}
_variants_loaded = False


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry (a name registered twice is an error unless ``replace``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a Task, got {type(task).__name__}")
    if task.name in _TASKS and not replace:
        raise TaskError(f"task {task.name!r} is registered twice")
    _TASKS[task.name] = task
    return task


def _load_variants() -> None:
    """Import ``VARIANT_MODULE`` once, if it exists; an error *inside* it is raised, not hidden."""
    global _variants_loaded
    if _variants_loaded:
        return
    _variants_loaded = True
    if importlib.util.find_spec(VARIANT_MODULE) is not None:
        importlib.import_module(VARIANT_MODULE)


def get_task(name: str) -> Task:
    """The task registered as ``name``; an unknown name raises TaskError listing every task."""
    _load_variants()
    if name not in _TASKS:
        raise TaskError(f"unknown task {name!r}; choose from: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def tasks(category: str | None = None) -> list[Task]:
    """Every registered task, sorted by name, optionally of one category."""
    _load_variants()
    if category is not None and category not in CATEGORIES:
        raise TaskError(f"unknown category {category!r}; choose from: {', '.join(CATEGORIES)}")
    return [_TASKS[n] for n in sorted(_TASKS) if category is None or _TASKS[n].category == category]


def task_names(category: str | None = None) -> list[str]:
    """The registered task names, sorted, optionally of one category."""
    return [t.name for t in tasks(category)]


# --------------------------------------------------------------------------------------------------
# Task specs: "name:key=value,key=value" strings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A task name (or a group: a category name, or ``synth``) and its raw options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


def parse_task_specs(text: str | Iterable[str | TaskSpec]) -> list[TaskSpec]:
    """Parse ``"a,b:k=v,k2=v2,c"`` (or a list of such strings) into specs.

    Pieces are separated by commas. A piece ``name`` or ``name:key=value`` starts a task; a piece
    ``key=value`` (no ``:`` before its ``=``) adds an option to the task before it. So
    ``"textvqa:path=/d/val.json,images=/d/img,synth-general-count"`` is two tasks. Values cannot hold
    commas; spaces around pieces are ignored.
    """
    pieces: list[str | TaskSpec] = [text] if isinstance(text, str) else list(text)
    specs: list[TaskSpec] = []
    for piece in pieces:
        if isinstance(piece, TaskSpec):
            specs.append(piece)
            continue
        current: tuple[str, dict[str, str]] | None = None
        for part in (p.strip() for p in piece.split(",")):
            if not part:
                continue
            head, eq, _ = part.partition("=")
            if eq and ":" not in head:  # "key=value": an option of the task before it
                if current is None:
                    raise TaskError(f"option {part!r} comes before any task name in {piece!r}")
                _add_option(current, part)
                continue
            if current is not None:
                specs.append(TaskSpec(current[0], current[1]))
            name, colon, rest = part.partition(":")
            if not name.strip():
                raise TaskError(f"empty task name in {piece!r}")
            current = (name.strip(), {})
            if colon:
                _add_option(current, rest)
        if current is not None:
            specs.append(TaskSpec(current[0], current[1]))
    if not specs:
        raise TaskError("no task given")
    return specs


def _add_option(current: tuple[str, dict[str, str]], text: str) -> None:
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise TaskError(f"task {current[0]}: option {text!r} is not key=value")
    if key in current[1]:
        raise TaskError(f"task {current[0]}: option {key} given twice")
    current[1][key] = value.strip()


def resolve_task_specs(
    specs: str | Iterable[str | TaskSpec], check_files: bool = True
) -> list[tuple[str, Task, dict[str, Any]]]:
    """``(result name, task, resolved options)`` for every spec, groups expanded, in the order given.

    A category name expands to that category's tasks that need no files, ``synth`` to every synthetic
    task and ``all`` to every task that needs no files; options given to a group apply to each task.
    Two results with one name (the same task twice) raise TaskError: give one of them ``name=``.
    ``check_files``: path options must exist (off where only the syntax is checked, e.g. a recipe loaded
    away from its data).
    """
    resolved: list[tuple[str, Task, dict[str, Any]]] = []
    for spec in parse_task_specs(specs):
        _load_variants()
        if spec.name in _TASKS:
            group = [_TASKS[spec.name]]
        elif spec.name in CATEGORIES or spec.name in ("synth", "all"):
            if spec.name == "synth":
                group = [t for t in tasks() if t.name.startswith(SYNTH_PREFIX)]
            else:
                group = [t for t in tasks(None if spec.name == "all" else spec.name) if not t.needs_files]
            if not group:
                raise TaskError(f"{spec.name!r} names no task that runs without files")
        else:
            raise TaskError(
                f"unknown task {spec.name!r}; choose a task ({', '.join(sorted(_TASKS))}), a category "
                f"({', '.join(CATEGORIES)}), 'synth' or 'all'"
            )
        for task in group:
            options = task.resolve_options(spec.options, check_files)
            resolved.append((options["name"] or task.name, task, options))
    names = [name for name, _, _ in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TaskError(f"task(s) {', '.join(repeated)} listed twice; give each run its own name=LABEL")
    return resolved


# --------------------------------------------------------------------------------------------------
# Answer parsers and scorers (thin adapters over mm15.eval.metrics)
# --------------------------------------------------------------------------------------------------


def short_answer(output: str, item: TaskItem) -> str:
    """The first non-empty line, stripped: short-answer tasks ignore anything the model adds after it."""
    for line in output.splitlines():
        if line.strip():
            return line.strip()
    return ""


def whole_answer(output: str, item: TaskItem) -> str:
    """The whole output, surrounding whitespace removed (transcriptions, boxes, long answers)."""
    return output.strip()


def normalized_match(prediction: str, item: TaskItem) -> float:
    """1 if the prediction equals a reference after VQA answer normalisation (case, articles, number
    words, punctuation): the single-reference exact match of the synthetic short-answer tasks."""
    pred = metrics.normalize_vqa_answer(prediction)
    return float(any(pred == metrics.normalize_vqa_answer(a) for a in item.answers))


def vqa_score(prediction: str, item: TaskItem) -> float:
    return metrics.vqa_accuracy(prediction, list(item.answers))


def anls_score(prediction: str, item: TaskItem) -> float:
    return metrics.anls(prediction, list(item.answers))


def similarity_score(prediction: str, item: TaskItem) -> float:
    """1 - normalised edit distance, unthresholded: partial credit for long transcriptions."""
    return max(metrics.anls_similarity(prediction, a) for a in item.answers)


def relaxed_score(prediction: str, item: TaskItem) -> float:
    """ChartQA's relaxed accuracy (pix2struct ``relaxed_correctness``, 5 %; the best over the answers).

    Nothing else: a number with a final period ("16.") parses as one, but a word does not lose it
    ("Yes." is not "Yes", as in pix2struct and lmms-eval).
    """
    return metrics.relaxed_accuracy(prediction, list(item.answers))


def choice_score(prediction: str, item: TaskItem) -> float:
    options = item.meta.get("options") or []
    if not options:  # an MMMU open question
        return float(metrics.mmmu_open_correct(prediction, list(item.answers)))
    return float(metrics.choice_correct(prediction, item.answers[0], options))


def grounding_score(prediction: str, item: TaskItem) -> float:
    """Acc@IoU>=0.5 of the first box in the answer (our ``[x1, y1, x2, y2]`` text units)."""
    meta = item.meta
    return float(metrics.grounding_hit(prediction, meta["box"], meta["width"], meta["height"]))


def referring_score(prediction: str, item: TaskItem) -> float:
    """1 if the answer names the referred object, colour and shape (LVIS-Ref style referring accuracy:
    the class at a box or point; our objects' class is their colour-and-shape phrase)."""
    words = f" {metrics.normalize_vqa_answer(prediction)} "
    return float(all(f" {phrase} " in words for phrase in item.meta["objects"]))


def click_score(prediction: str, item: TaskItem) -> float:
    meta = item.meta
    return float(metrics.screenspot_hit(prediction, meta["box"], meta["width"], meta["height"]))


def ocrbench_score(prediction: str, item: TaskItem) -> float:
    return float(metrics.ocrbench_correct(prediction, list(item.answers), item.meta["dataset_name"]))


def pope_score(prediction: str, item: TaskItem) -> float:
    return float(metrics.pope_parse(prediction) == item.answers[0])


def pope_aggregate(
    predictions: Sequence[str], items: Sequence[TaskItem], scores: Sequence[float]
) -> dict[str, float]:
    """POPE's headline number is F1 (x100); accuracy, precision, recall and yes-ratio come with it."""
    result = metrics.pope_metrics(list(predictions), [item.answers[0] for item in items])
    named = {k: 100.0 * result[k] for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")}
    return {"score": named["f1"], **named}


def ocrbench_aggregate(
    predictions: Sequence[str], items: Sequence[TaskItem], scores: Sequence[float]
) -> dict[str, float]:
    """OCRBench: the share of correct items x100 (= Final Score / 10 on all 1000), and counts by type."""
    counts = metrics.ocrbench_aggregate([item.meta["type"] for item in items], [s > 0 for s in scores])
    return {"score": 100.0 * sum(scores) / len(scores), **{f"count/{k}": v for k, v in counts.items()}}


# --------------------------------------------------------------------------------------------------
# Held-out synthetic tasks
# --------------------------------------------------------------------------------------------------

SYNTH_PREFIX = "synth-"
SYNTH_SIZE = 200  # items per synthetic task unless size= says otherwise
MAX_REJECTED = 1000  # a filtered synthetic task gives up after this many rejected samples in a row


def sample_to_item(sample: Sample) -> TaskItem:
    """The first user turn as the question and the assistant turn after it as the reference.

    Regions are written as text for the rendered images' sizes (``mm15.chat.render_regions``). ``meta``
    holds the image sizes, the multiple-choice options when the sample has them, and for a grounding
    sample (one with ``truth["qa"]``, or whose answer is a box region alone) the truth region of the first
    answer: its pixel box and image size.
    """
    from mm15.chat import render_regions
    from mm15.image import load_image

    pictures = [load_image(ref) for ref in sample.images]
    sizes = [(p.height, p.width) for p in pictures]
    user = next((k for k, t in enumerate(sample.turns) if t.role == "user"), None)
    reply = next(
        (k for k, t in enumerate(sample.turns) if user is not None and k > user and t.role == "assistant"),
        None,
    )
    if user is None or reply is None:
        raise ValueError(f"sample {sample.id} has no user turn followed by an assistant turn")
    meta: dict[str, Any] = {"sizes": sizes}
    if isinstance(sample.truth.get("options"), list):
        meta["options"] = list(sample.truth["options"])
    qa = sample.truth.get("qa")
    scene = sample.truth.get("scene")
    objects = scene.get("objects") if isinstance(scene, dict) else None
    if isinstance(qa, list) and qa and qa[0].get("targets") and isinstance(objects, list):
        # The colour-and-shape phrases of the objects the first answer is about (referring tasks).
        meta["objects"] = [f"{objects[k]['color']} {objects[k]['shape']}" for k in qa[0]["targets"]]
    answer_region: int | None = None
    if isinstance(qa, list) and qa and qa[0].get("answer_regions"):
        answer_region = qa[0]["answer_regions"][0]
    elif bare := REGION_PATTERN.fullmatch(sample.turns[reply].content.strip()):
        answer_region = int(bare.group(1))  # the answer is a box and nothing else (read-text's "find")
    if answer_region is not None:
        region = sample.regions[answer_region]
        if region.box is not None:
            height, width = sizes[region.image]
            meta.update(box=tuple(region.box), width=width, height=height)
    # The question keeps only its own images: those of its placeholders, after any in earlier turns.
    first = sum(turn.content.count(IMAGE_PLACEHOLDER) for turn in sample.turns[:user])
    count = sample.turns[user].content.count(IMAGE_PLACEHOLDER)
    return TaskItem(
        id=sample.id,
        question=render_regions(sample.turns[user].content, sample, sizes),
        answers=(render_regions(sample.turns[reply].content, sample, sizes),),
        images=tuple(pictures[first : first + count]),
        meta=meta,
    )


def synthetic_source(generator: str, keep: Callable[[Sample], bool] | None = None) -> ItemSource:
    """Items of ``generator``'s eval split; with ``keep``, only the samples it accepts, in index order."""

    def source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
        from mm15.data.synth import generate

        seed, size = options["seed"], options["size"]
        if size < 1:
            raise TaskError(f"task {SYNTH_PREFIX}{generator}: size must be >= 1, got {size}")
        if keep is None:
            return LazyItems(size, lambda index: sample_to_item(generate(generator, index, "eval", seed)))
        kept: list[int] = []  # eval-split indices of the accepted samples, found in order on demand

        def make(position: int) -> TaskItem:
            if position < len(kept):
                return sample_to_item(generate(generator, kept[position], "eval", seed))
            candidate = kept[-1] + 1 if kept else 0
            while True:  # scan on; the sample accepted at ``position`` is used as generated
                if candidate - (kept[-1] if kept else 0) > MAX_REJECTED:
                    raise TaskError(f"generator {generator}: no accepted sample in {MAX_REJECTED} in a row")
                sample = generate(generator, candidate, "eval", seed)
                if keep(sample):
                    kept.append(candidate)
                    if len(kept) > position:
                        return sample_to_item(sample)
                candidate += 1

        return LazyItems(size, make)

    return source


def synthetic_task(
    generator: str,
    category: str,
    *,
    score: Scorer,
    metric: str,
    max_new_tokens: int,
    parse: AnswerParser = short_answer,
    version: str = "1",
    name: str | None = None,
    keep: Callable[[Sample], bool] | None = None,
    description: str | None = None,
    aggregate: Aggregator = mean_score,
) -> Task:
    """A held-out task on synthetic generator ``generator`` (items of the eval split, seed ``seed=``).

    ``name`` defaults to ``synth-<generator>``; ``keep`` selects some of the generator's samples (a task
    on one kind of question of a generator that mixes several)."""
    return Task(
        name=name or SYNTH_PREFIX + generator,
        category=category,
        version=version,
        description=description or f"held-out samples of the {generator} generator (eval split)",
        prompt="{question}",  # the generators' questions carry their own answer-format instructions
        generation=GenerationConfig(max_new_tokens=max_new_tokens),
        parse=parse,
        score=score,
        metric=metric,
        source=synthetic_source(generator, keep),
        options=(
            TaskOption("seed", int, "the eval split's seed", 0),
            TaskOption("size", int, "items in the held-out set", SYNTH_SIZE),
        ),
        benchmark=name or SYNTH_PREFIX + generator,
        aggregate=aggregate,
    )


def read_text_score(prediction: str, item: TaskItem) -> float:
    """Per item of the read-text generator: a "find" item (the reference is the text's box, in
    ``meta["box"]``) is scored as grounding, Acc@IoU>=0.5 of the first box (``grounding_score``); a
    "read" item (the reference is the text) by ANLS. ANLS on a box's digits would pay 0.85 for a box of
    the right size nowhere near the text."""
    return grounding_score(prediction, item) if "box" in item.meta else anls_score(prediction, item)


def read_text_aggregate(
    predictions: Sequence[str], items: Sequence[TaskItem], scores: Sequence[float]
) -> dict[str, float]:
    """The mean item score x100, and each kind's own: ``anls/read`` and ``accuracy/find`` (x100) with
    ``items/read`` and ``items/find``."""
    out = mean_score(predictions, items, scores)
    for kind, metric in (("read", "anls"), ("find", "accuracy")):
        kept = [s for item, s in zip(items, scores, strict=True) if ("box" in item.meta) == (kind == "find")]
        if kept:
            out[f"{metric}/{kind}"] = 100.0 * sum(kept) / len(kept)
        out[f"items/{kind}"] = float(len(kept))
    return out


def is_grounding_question(sample: Sample) -> bool:
    """Whether a refer-ground sample's first question asks for boxes (phrase -> box): the grounding
    questions. Its referring questions write the object's box in the question (refer-box) or answer with
    the box of the object at a point (refer-point); synth-refer scores those."""
    return sample.truth["qa"][0]["task"] in ("ground", "ground-multi")


EXACT = "exact match after VQA normalisation"
RELAXED = "relaxed accuracy (pix2struct)"
# (generator, category, scorer, metric, parser, max_new_tokens, version). MM1.5 puts math, science and
# code style benchmarks (MathVista, AI2D, ScienceQA, MMMU) under "knowledge". Versions:
# * relaxed accuracy 2: version 1 also accepted an answer with its final period dropped ("Yes." for
#   "Yes"), which pix2struct's rule does not;
# * every task on a document generator (text drawn with a font), +1: fonts are laid out by Pillow's
#   basic engine (mm15.data.synth.render), where Raqm laid them out on machines that have it: other
#   pixels and text boxes there;
# * read-text 2: "find" items (answer: a box) are scored by Acc@IoU>=0.5, no longer by ANLS on the box's
#   digits (read_text_score);
# * refer-ground 2: grounding questions only (is_grounding_question): a referring question's first box
#   is written in the question, so echoing it scored;
# * icl 2: episodes another rule explains as well but answers differently are drawn again.
_SYNTHETIC: tuple[tuple[str, str, Scorer, str, AnswerParser, int, str], ...] = (
    ("general-color", "general", normalized_match, EXACT, short_answer, 8, "1"),
    ("general-count", "general", normalized_match, EXACT, short_answer, 8, "1"),
    ("general-spatial", "general", normalized_match, EXACT, short_answer, 8, "1"),
    ("chart-qa", "text-rich", relaxed_score, RELAXED, short_answer, 16, "3"),
    ("doc-qa", "text-rich", anls_score, "ANLS (rrc)", short_answer, 24, "2"),
    ("table-qa", "text-rich", relaxed_score, RELAXED, short_answer, 16, "3"),
    (
        "read-text",
        "text-rich",
        read_text_score,
        "ANLS (rrc) on read items, Acc@IoU>=0.5 on find items",
        short_answer,
        32,
        "2",
    ),
    ("math-chart", "knowledge", relaxed_score, RELAXED, short_answer, 16, "3"),
    ("science-diagram", "knowledge", choice_score, "multiple choice (canonical)", short_answer, 8, "2"),
    (
        "code-screenshot",
        "knowledge",
        similarity_score,
        "1 - normalised edit distance",
        whole_answer,
        256,
        "2",
    ),
    ("refer-ground", "refer-ground", grounding_score, "Acc@IoU>=0.5 (first box)", whole_answer, 48, "2"),
    ("multi-image", "multi-image", normalized_match, EXACT, short_answer, 8, "1"),
    ("icl", "in-context", normalized_match, EXACT, short_answer, 8, "2"),
)
# What some synthetic tasks add to the table: a sample filter, a description, an aggregate.
_SYNTHETIC_EXTRA: dict[str, dict[str, Any]] = {
    "refer-ground": {
        "keep": is_grounding_question,
        "description": "held-out grounding questions of the refer-ground generator: the box(es) of a "
        "named object or of every object of a colour (eval split)",
    },
    "read-text": {"aggregate": read_text_aggregate},
}
for _generator, _category, _score, _metric, _parse, _budget, _version in _SYNTHETIC:
    register_task(
        synthetic_task(
            _generator,
            _category,
            score=_score,
            metric=_metric,
            parse=_parse,
            max_new_tokens=_budget,
            version=_version,
            **_SYNTHETIC_EXTRA.get(_generator, {}),
        )
    )
# MM1.5's refer & ground category averages grounding (RefCOCO, Flickr30k: Acc@IoU) with referring
# (LVIS-Ref: name the object at a box or point). synth-refer-ground asks only the grounding questions
# and scores the first box of the first answer; synth-refer asks only the referring questions and
# scores the object's name.
register_task(
    synthetic_task(
        "refer-ground",
        "refer-ground",
        name=SYNTH_PREFIX + "refer",
        keep=lambda sample: sample.truth["qa"][0]["task"] in ("refer-box", "refer-point"),
        description="held-out referring questions of the refer-ground generator: name the object at a "
        "box or a point (eval split)",
        score=referring_score,
        metric="referring accuracy (colour and shape named)",
        parse=whole_answer,
        max_new_tokens=24,
    )
)


# --------------------------------------------------------------------------------------------------
# Real benchmarks (annotation files in their authors' formats, see mm15.eval.loaders)
# --------------------------------------------------------------------------------------------------


def _images_root(options: Mapping[str, Any]) -> Path:
    return Path(options["images"]) if options.get("images") else Path(options["path"]).parent


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as the model sees it (EXIF-upright), from its header alone."""
    try:
        return image_size(path)
    except (OSError, ValueError) as err:  # ImageError is a ValueError
        raise TaskError(f"cannot read the image {path}: {err}") from None


def from_eval_set(eval_set: loaders.EvalSet, root: Path, *, lead: str = "<image>\n") -> ItemList:
    """Loader items as task items: the image under ``root`` (placeholder in ``lead``) when there is one.
    The loader's skip counts (``EvalSet.skipped``) come along as ``ItemList.skipped``."""
    out = []
    for item in eval_set:
        has_image = item.image is not None
        out.append(
            TaskItem(
                id=item.id,
                question=item.question,
                answers=tuple(item.answers),
                images=(root / item.image,) if has_image else (),  # type: ignore[operator]
                lead=lead if has_image else "",
                meta=dict(item.meta),
            )
        )
    return ItemList(out, eval_set.skipped)


PATH_HELP = "the annotation file"
IMAGES_OPTION = TaskOption("images", Path, "the image folder (default: the annotation file's folder)")


def _simple_source(load: Callable[[Path], loaders.EvalSet]) -> ItemSource:
    def source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
        return from_eval_set(load(Path(options["path"])), _images_root(options))

    return source


def _real_task(
    name: str,
    category: str,
    description: str,
    source: ItemSource,
    *,
    score: Scorer,
    metric: str,
    prompt: str = "{question}\n" + SHORT_ANSWER,
    max_new_tokens: int = 16,
    parse: AnswerParser = short_answer,
    aggregate: Aggregator = mean_score,
    extra_options: tuple[TaskOption, ...] = (),
    path_help: str = PATH_HELP,
    version: str = "1",
    check: Callable[[Mapping[str, Any]], None] | None = None,
    split_mean: str = "items",
) -> Task:
    """A real benchmark, the benchmark of its results (``Task.benchmark``): results of one task on
    several files or splits are that benchmark's splits, combined by ``split_mean``."""
    return register_task(
        Task(
            name=name,
            category=category,
            version=version,
            description=description,
            prompt=prompt,
            generation=GenerationConfig(max_new_tokens=max_new_tokens),
            parse=parse,
            score=score,
            metric=metric,
            source=source,
            options=(TaskOption("path", Path, path_help, required=True), IMAGES_OPTION, *extra_options),
            aggregate=aggregate,
            check=check,
            benchmark=name,
            split_mean=split_mean,
        )
    )


_real_task(
    "textvqa",
    "text-rich",
    "TextVQA val (TextVQA_0.5.1_val.json; images train_images/)",
    _simple_source(loaders.load_textvqa),
    score=vqa_score,
    metric="VQA accuracy (evalai)",
    path_help="TextVQA_0.5.1_val.json",
)
_real_task(
    "docvqa",
    "text-rich",
    "DocVQA (val_v1.0.json; image paths as in the file)",
    _simple_source(loaders.load_docvqa),
    score=anls_score,
    metric="ANLS (rrc)",
    max_new_tokens=32,
)
_real_task(
    "infovqa",
    "text-rich",
    "InfographicVQA (infographicsVQA_val_v1.0.json)",
    _simple_source(loaders.load_infovqa),
    score=anls_score,
    metric="ANLS (rrc)",
    max_new_tokens=32,
)
_real_task(
    "chartqa",
    "text-rich",
    "ChartQA test_human.json or test_augmented.json (images png/)",
    _simple_source(loaders.load_chartqa),
    score=relaxed_score,
    metric="relaxed accuracy (pix2struct)",
    version="2",  # version 1 also accepted the answer with a final period dropped ("Yes." for "Yes")
    split_mean="items",  # the overall is the mean over the union of test_human and test_augmented
)
_real_task(
    "ocrbench",
    "text-rich",
    "OCRBench v1 (OCRBench.json)",
    _simple_source(loaders.load_ocrbench),
    score=ocrbench_score,
    metric="OCRBench (official; % correct)",
    prompt="{question}",
    max_new_tokens=64,
    parse=whole_answer,
    aggregate=ocrbench_aggregate,
)


_real_task(
    "pope",
    "general",
    "POPE coco_pope_{random,popular,adversarial}.json (COCO val2014 images)",
    _simple_source(loaders.load_pope),
    score=pope_score,
    metric="POPE F1 (official parse)",
    max_new_tokens=8,
    parse=whole_answer,
    aggregate=pope_aggregate,
    split_mean="splits",  # F1 per split and their mean (random, popular, adversarial)
)


def _vqav2_source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
    annotations = options.get("annotations")
    return from_eval_set(loaders.load_vqav2(Path(options["path"]), annotations), _images_root(options))


_real_task(
    "vqav2",
    "general",
    "VQAv2 questions + annotations JSON pair",
    _vqav2_source,
    score=vqa_score,
    metric="VQA accuracy (evalai)",
    extra_options=(TaskOption("annotations", Path, "the annotations JSON", required=True),),
    path_help="the questions JSON",
)


def _split_required(task: str) -> Callable[[Mapping[str, Any]], None]:
    """A ``Task.check`` for annotation files that hold every split, train included (RefCOCO refs,
    ScienceQA ``problems.json``): run whole, they would score training items with the test ones, so
    ``split=`` is required. No split is picked by default: RefCOCO / RefCOCO+ have testA and testB,
    RefCOCOg test, and no other task here chooses a split for the user either."""

    def check(options: Mapping[str, Any]) -> None:
        if options.get("split") is not None:
            return
        path = Path(options["path"])
        try:
            splits = loaders.record_splits(path)
            held = f"{path} holds the splits {', '.join(splits)}" if splits else f"{path} names no split"
        except (OSError, ValueError):  # unreadable here: the loader says why when the task runs
            held = f"{path} could not be read to list its splits"
        raise TaskError(
            f"task {task}: option split=... is required ({held}); without it every split would be "
            "evaluated, train included"
        )

    return check


def _refcoco_source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
    _split_required("refcoco")(options)  # for options that did not go through resolve_options
    split = options.get("split")
    eval_set = loaders.load_refcoco(Path(options["path"]), Path(options["instances"]), split=split)
    # The loader's meta holds the pixel box, width and height that grounding_score reads.
    return from_eval_set(eval_set, _images_root(options))


_real_task(
    "refcoco",
    "refer-ground",
    "RefCOCO / RefCOCO+ / RefCOCOg: refs JSON + COCO instances JSON (split= testA, testB, val, test)",
    _refcoco_source,
    score=grounding_score,
    metric="Acc@IoU>=0.5 (canonical, mm15 text units)",
    prompt="Give the bounding box of {question}.",
    max_new_tokens=32,
    parse=whole_answer,
    extra_options=(
        TaskOption("instances", Path, "the COCO instances JSON", required=True),
        TaskOption("split", str, "the split to evaluate (required: testA, testB, val, test)"),
    ),
    path_help="the refs JSON (refs(<splitBy>).p converted to JSON)",
    check=_split_required("refcoco"),
    # Acc@0.5 per split and the mean of the splits: MM1.5-style tables average RefCOCO, RefCOCO+ and
    # RefCOCOg's splits into one RefCOCO number.
    split_mean="splits",
)


def _screenspot_source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
    root = _images_root(options)
    items = from_eval_set(loaders.load_screenspot(Path(options["path"])), root)

    def with_size(item: TaskItem) -> TaskItem:
        width, height = _image_size(item.images[0])  # type: ignore[arg-type]
        # The size comes from the screenshot, so the box is checked here, not by the loader.
        if (outside := loaders.box_outside_image(item.meta["box"], width, height)) is not None:
            raise TaskError(f"{options['path']}: record {item.id}: {outside} {item.images[0]}")
        return dataclasses.replace(item, meta={**item.meta, "width": width, "height": height})

    return LazyItems(len(items), lambda index: with_size(items[index]))


def screenspot_aggregate(
    predictions: Sequence[str], items: Sequence[TaskItem], scores: Sequence[float]
) -> dict[str, float]:
    """The mean click accuracy x100, and accuracy and item count per platform x {text, icon}, as
    SeeClick reports ScreenSpot (``accuracy/mobile/icon``, ``items/mobile/icon``; the platform is the
    file's: mobile, desktop or web, left out when the file name does not say)."""
    cells: dict[str, list[float]] = {}
    for item, score in zip(items, scores, strict=True):
        key = "/".join(str(v) for v in (item.meta.get("platform"), item.meta.get("data_type")) if v)
        cells.setdefault(key or "all", []).append(score)
    out = mean_score(predictions, items, scores)
    for key in sorted(cells):
        out[f"accuracy/{key}"] = 100.0 * sum(cells[key]) / len(cells[key])
        out[f"items/{key}"] = float(len(cells[key]))
    return out


_real_task(
    "screenspot",
    "ui",
    "ScreenSpot screenspot_{mobile,desktop,web}.json (images screenspot_imgs/)",
    _screenspot_source,
    score=click_score,
    metric="click accuracy (canonical, mm15 text units)",
    prompt='Where is "{question}"? Answer in [x1, y1, x2, y2] format.',
    max_new_tokens=32,
    parse=whole_answer,
    aggregate=screenspot_aggregate,
)


def _choice_source(*, require_image: bool = False, split_required: str | None = None) -> ItemSource:
    """Multiple-choice items; ``split_required`` names a task whose file holds every split."""

    def source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
        if split_required:
            _split_required(split_required)(options)  # for options that skipped resolve_options
        eval_set = loaders.load_multiple_choice(
            Path(options["path"]), split=options.get("split"), require_image=require_image
        )
        items = ItemList(skipped=eval_set.skipped)
        for item in from_eval_set(eval_set, _images_root(options)):
            choices = item.meta.get("options") or []
            if choices:
                letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                block = "\n".join(f"{letters[k]}. {text}" for k, text in enumerate(choices))
                block += "\n" + CHOICE_ANSWER
            else:
                block = SHORT_ANSWER
            # ScienceQA's hint is the passage many questions are about ("Which figure of speech is
            # used in this text?"); lmms-eval (sqa_doc_to_text) puts it first as "Context: ...".
            hint = item.meta.get("hint")
            context = f"Context: {hint}\n" if isinstance(hint, str) and hint else ""
            items.append(dataclasses.replace(item, fields={"options": block, "context": context}))
        return items

    return source


_CHOICE_PROMPT = "{question}\n{options}"
for _name, _category, _description in (
    ("ai2d", "knowledge", "AI2D test (MC records, 0-based answer index)"),
    ("mmmu", "knowledge", "MMMU val (MC and open questions; first image only)"),
    (
        "seedbench",
        "general",
        "SEED-Bench image questions (SEED-Bench.json; images= SEED-Bench-image/; video items skipped)",
    ),
):
    _real_task(
        _name,
        _category,
        _description,
        _choice_source(),
        score=choice_score,
        metric="multiple choice (canonical); MMMU open: mmmu_open_correct",
        prompt=_CHOICE_PROMPT,
        max_new_tokens=8,
        extra_options=(TaskOption("split", str, "keep records of this split"),),
    )
# problems.json holds train, val and test: split= is required. Version 2: the hint is given as
# context (lmms-eval's prompt) and images are read from images/<split>/<pid>/.
_real_task(
    "scienceqa",
    "knowledge",
    "ScienceQA-IMG (problems.json; split= required, e.g. test; images= the images/ folder)",
    _choice_source(require_image=True, split_required="scienceqa"),
    score=choice_score,
    metric="multiple choice (canonical); MMMU open: mmmu_open_correct",
    prompt="{context}" + _CHOICE_PROMPT,
    max_new_tokens=8,
    extra_options=(TaskOption("split", str, "the split to evaluate (required: test, val, train)"),),
    version="2",
    check=_split_required("scienceqa"),
)
