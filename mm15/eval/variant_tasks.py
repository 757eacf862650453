"""Evaluation tasks of the MM1.5-Video and MM1.5-UI variants, registered with ``mm15.eval.tasks``.

The task registry imports this module on its first lookup (``tasks.VARIANT_MODULE``); importing it
registers every task below with ``register_task``.

**Video** (category ``video``; MM1.5-Video, mm15-spec.md section 6: 24 uniformly sampled frames, each
one unsplit image). Items carry ``meta["is_video"] = True`` for the runner: its processor leaves any
prompt of 3 or more images unsplit, which covers every clip but one of only 1-2 frames.

=================  ==============================================================  =========================
task               items                                                           metric
=================  ==============================================================  =========================
``synth-video``    held-out clips of the ``video`` generator (eval split)           exact match (VQA norm.)
``video-mc``       MVBench-style multiple choice: ``path=`` annotations            accuracy, canonical letter
                   (``mm15.data.video_qa`` records with ``candidates``),            extraction
                   ``videos=`` folder, ``frames=`` (24)
``video-qa``       open-ended (ActivityNet-QA style): the same options and         judge accuracy
                   ``judge=`` (a registered ``VideoJudge``)
=================  ==============================================================  =========================

Open-ended answers are judged by a pluggable ``VideoJudge``: a callable ``(question, answer,
prediction) -> JudgeVerdict`` with a ``label``. MM1.5 judges ActivityNet-QA with GPT-3.5; a network
judge cannot run here, so the default judge is ``exact-match``, normalised exact match, whose label
``exact-match (offline fallback, not a GPT judge)`` is in the metric name of every result it produces.
``LLMJudge`` wraps any chat-completion callable ``complete(messages) -> reply`` (an OpenAI-compatible
client, a local model) with ActivityNet-QA's protocol: Video-ChatGPT's system and user messages
verbatim (``JUDGE_SYSTEM``, ``JUDGE_USER``), the reply read by ``metrics.parse_judge_reply`` (yes / no
and a 0-5 score), accuracy = #yes / (#yes + #no) and the mean score by ``metrics.judge_aggregate``;
``register_judge("gpt-3.5", LLMJudge(my_complete, "gpt-3.5-turbo-0125"))`` then ``judge=gpt-3.5``.

``video-mc`` and ``video-qa`` read the same annotation files and each keeps one kind of record; the
records they leave out are counted by reason with the result (``"open_ended"`` / ``"multiple_choice"``:
the other task's records; ``"conversation"``: free-form conversations, which neither task scores).

**UI** (category ``ui``; the Ferret-UI elementary tasks of MM1.5-UI). Held-out synthetic screens of the
``ui-*`` generators, phones (tall) and tablets (wide), any aspect ratio through the image plan:

=========================  ========================================  ==================================
task                       Ferret-UI task                            metric
=========================  ========================================  ==================================
``synth-ui-ocr``           referring: OCR of the text at a box       exact match (VQA normalisation)
``synth-ui-icon``          referring: icon recognition               exact match (VQA normalisation)
``synth-ui-widget``        referring: widget classification          exact match (VQA normalisation)
``synth-ui-find-text``     grounding: find text                      Acc@IoU>=0.5
``synth-ui-find-icon``     grounding: find icon                      Acc@IoU>=0.5
``synth-ui-find-widget``   grounding: find widget                    Acc@IoU>=0.5
``synth-ui-list``          grounding: widget listing                 element F1 at IoU>=0.5 (below)
``synth-ui-click``         ScreenSpot-style click (text, icon and    click in the target box
                           widget targets in turn)
=========================  ========================================  ==================================

The same tasks run on real screenshots annotated in the **UI-elements JSON** format (one screenshot per
file; ``tests/fixtures/seeclick_calendar_boxes.json`` is one)::

    {"image": "screen.png", "width": W, "height": H,
     "elements": [{"class": "button", "text": "Today", "box": [x1, y1, x2, y2],
                   "text_box": [x1, y1, x2, y2]},                   # optional: the text's ink box
                  {"class": "icon", "name": "plus", "box": [...]}, ...]}

with boxes in original pixels and ``class`` one of the generators' classes (button, text field, toggle,
checkbox, icon, label). Buttons, text fields and labels need a ``text``, toggles and checkboxes a
``label`` (or ``text``), icons a ``name``, each a non-empty string; ``width`` and ``height`` must be the
screenshot's size as the model sees it (EXIF-upright), which is checked against the image.
``ui-ocr``, ``ui-icon``, ``ui-widget``, ``ui-ground`` (find text, icon and widget) and ``ui-click`` take
``path=`` (the JSON) and ``images=`` (default: the JSON's folder). Questions use the generators'
wording, so a model fine-tuned on the synthetic UI data is asked as it was trained.

**Widget listing metric** (``ui_list_f1``). Every line of the answer that holds a box is one predicted
element; its class is the first UI class named in the line (``search icon``: icon; ``toggle for "Wi-Fi"``:
toggle). Predicted and true elements are matched one to one, greedily by decreasing IoU, a pair
qualifying when the classes agree and IoU >= 0.5. The item's score is F1 = 2 * matched / (predicted +
true); the task's score is the mean F1 x 100.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mm15.boxes import format_box
from mm15.data.sample import Sample
from mm15.eval import metrics
from mm15.eval.tasks import (
    EXACT,
    SHORT_ANSWER,
    SYNTH_PREFIX,
    SYNTH_SIZE,
    ItemList,
    LazyItems,
    Task,
    TaskError,
    TaskItem,
    TaskOption,
    normalized_match,
    register_task,
    sample_to_item,
    short_answer,
    whole_answer,
)
from mm15.image import image_size
from mm15.model.generate import GenerationConfig
from mm15.video import DEFAULT_NUM_FRAMES

__all__ = [
    "FALLBACK_JUDGE_LABEL",
    "JUDGE_SYSTEM",
    "JUDGE_USER",
    "UI_CLASSES",
    "ExactMatchJudge",
    "JudgeVerdict",
    "LLMJudge",
    "VideoJudge",
    "get_judge",
    "judge_messages",
    "load_ui_elements",
    "register_judge",
    "ui_list_f1",
]

# The generators' widget classes; "text field" first so "text field" is not read as "text".
UI_CLASSES: tuple[str, ...] = ("text field", "button", "toggle", "checkbox", "icon", "label")
GROUND_SUFFIX = " Answer in [x1, y1, x2, y2] format."
WIDGET_QUESTION = (
    "What type of widget is in {region}? Choose from: button, text field, toggle, checkbox, icon, label."
)
FALLBACK_JUDGE_LABEL = "exact-match (offline fallback, not a GPT judge)"


# --------------------------------------------------------------------------------------------------
# Judges for open-ended video QA
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeVerdict:
    """A judge's decision on one answer: right (True) or wrong (False), or ``None`` when its reply said
    neither yes nor no (left out of the accuracy, #yes / (#yes + #no)), and a 0-5 score when the judge
    gives one."""

    correct: bool | None
    score: float | None = None


class VideoJudge(Protocol):
    """Judges an open-ended answer; ``label`` names it in every result it scores."""

    label: str

    def __call__(self, question: str, answer: str, prediction: str) -> JudgeVerdict: ...


class ExactMatchJudge:
    """The offline fallback: right iff the prediction equals the answer after VQA normalisation
    (case, punctuation, articles, number words). Far stricter than a GPT judge on free-form answers."""

    label = FALLBACK_JUDGE_LABEL

    def __call__(self, question: str, answer: str, prediction: str) -> JudgeVerdict:
        same = metrics.normalize_vqa_answer(prediction) == metrics.normalize_vqa_answer(answer)
        return JudgeVerdict(correct=same)


# ActivityNet-QA's judge messages, verbatim from Video-ChatGPT ``evaluate_activitynet_qa.py`` and
# lmms-eval ``tasks/activitynetqa/utils.py`` (identical in both, the two spaces in "is  a string" and
# the missing space after "STRING." included). Fill JUDGE_USER with str.replace, not str.format: a
# question or answer may hold braces.
JUDGE_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
JUDGE_USER = (
    "Please evaluate the following video-based question-answer pair:\n\n"
    "Question: {question}\n"
    "Correct Answer: {answer}\n"
    "Predicted Answer: {prediction}\n\n"
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 "
    "and 5, with 5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and "
    "'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, "
    "not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
)


def judge_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """ActivityNet-QA's judge request as chat messages (OpenAI's shape): the system message, then the
    user message with the question, the correct answer and the prediction filled in."""
    # One pass over the three fields, so a question holding "{answer}" is not filled in again.
    fields = {"{question}": question, "{answer}": answer, "{prediction}": prediction}
    parts = re.split(r"(\{question\}|\{answer\}|\{prediction\})", JUDGE_USER)
    user = "".join(fields.get(part, part) for part in parts)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


class LLMJudge:
    """ActivityNet-QA's protocol over a chat-completion function ``complete(messages) -> reply``.

    ``messages`` is ``judge_messages(...)``, a system and a user message in OpenAI's shape, so an
    OpenAI-compatible client (or ``mm15 serve``) is called as it is::

        def complete(messages):
            reply = client.chat.completions.create(
                model="gpt-3.5-turbo-0125", messages=messages, temperature=0, max_tokens=64
            )
            return reply.choices[0].message.content

    (lmms-eval's settings: temperature 0, 64 tokens.) The reply is read with
    ``metrics.parse_judge_reply`` (``{'pred': 'yes', 'score': 4}``; a reply with no readable dict is
    ``no`` with score 0, as in lmms-eval; a ``pred`` that is neither yes nor no is no verdict).
    Verdicts are cached by (question, answer, prediction), so scoring and aggregation call the model
    once per item.
    """

    def __init__(self, complete: Callable[[list[dict[str, str]]], str], label: str) -> None:
        self.complete = complete
        self.label = label
        self._cache: dict[tuple[str, str, str], JudgeVerdict] = {}

    def __call__(self, question: str, answer: str, prediction: str) -> JudgeVerdict:
        key = (question, answer, prediction)
        if key not in self._cache:
            reply = self.complete(judge_messages(question, answer, prediction))
            if not isinstance(reply, str):
                raise TypeError(
                    f"judge {self.label!r}: complete(messages) must return the reply text, got "
                    f"{type(reply).__name__}"
                )
            pred, score = metrics.parse_judge_reply(reply)
            correct = True if pred == "yes" else False if pred == "no" else None
            self._cache[key] = JudgeVerdict(correct=correct, score=float(score))
        return self._cache[key]


_JUDGES: dict[str, VideoJudge] = {"exact-match": ExactMatchJudge()}


def register_judge(name: str, judge: VideoJudge, *, replace: bool = False) -> None:
    """Make ``judge`` available to ``video-qa`` as ``judge=<name>``."""
    if not name or any(c in name for c in ":,= "):
        raise TaskError(f"judge name {name!r} must be non-empty, without ':', ',', '=' or spaces")
    if not callable(judge) or not isinstance(getattr(judge, "label", None), str):
        raise TaskError(f"judge {name!r} must be callable and have a str label")
    if name in _JUDGES and not replace:
        raise TaskError(f"judge {name!r} is registered twice")
    _JUDGES[name] = judge


def get_judge(name: str) -> VideoJudge:
    if name not in _JUDGES:
        raise TaskError(f"unknown judge {name!r}; registered judges: {', '.join(sorted(_JUDGES))}")
    return _JUDGES[name]


# --------------------------------------------------------------------------------------------------
# Video tasks
# --------------------------------------------------------------------------------------------------


def video_item(sample: Sample, **meta: Any) -> TaskItem:
    """A video sample as a task item: frames as images, flagged ``is_video`` (module docstring)."""
    item = sample_to_item(sample)
    return dataclasses.replace(item, meta={**item.meta, "is_video": True, **meta})


def _synth_options() -> tuple[TaskOption, ...]:
    return (
        TaskOption("seed", int, "the eval split's seed", 0),
        TaskOption("size", int, "items in the held-out set", SYNTH_SIZE),
    )


def _synthetic_items(
    name: str, generators: Sequence[str], make: Callable[[Sample], TaskItem]
) -> Callable[[Mapping[str, Any]], Sequence[TaskItem]]:
    """Held-out items of ``generators`` (in turn, item i from generator i mod n), built on access."""

    def source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
        from mm15.data.synth import generate

        seed, size = options["seed"], options["size"]
        if size < 1:
            raise TaskError(f"task {name}: size must be >= 1, got {size}")
        n = len(generators)
        return LazyItems(size, lambda i: make(generate(generators[i % n], i // n, "eval", seed)))

    return source


def _video_options() -> tuple[TaskOption, ...]:
    return (
        TaskOption("path", Path, "the annotations (JSON / JSONL, mm15.data.video_qa records)", required=True),
        TaskOption("videos", Path, "the video folder (default: the annotation file's folder)"),
        TaskOption("frames", int, "frames sampled per video", DEFAULT_NUM_FRAMES),
    )


def _video_file_items(
    task: str, kind: str, judge: bool = False
) -> Callable[[Mapping[str, Any]], Sequence[TaskItem]]:
    """Items of the records of one kind ("multiple-choice" / "open-ended"), videos decoded on access."""

    def source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
        from mm15.data.video_qa import VideoQAReader

        if options["frames"] < 1:
            raise TaskError(f"task {task}: frames must be >= 1, got {options['frames']}")
        reader = VideoQAReader(options["path"], options.get("videos"), num_frames=options["frames"])
        wanted = []
        skipped = {"conversation": 0, "open_ended" if kind == "multiple-choice" else "multiple_choice": 0}
        for index, entry in enumerate(reader.records()):
            record = entry[2]
            if "conversations" in record:
                skipped["conversation"] += 1
            elif ("candidates" in record) != (kind == "multiple-choice"):
                skipped["multiple_choice" if "candidates" in record else "open_ended"] += 1
            else:
                wanted.append((index, entry))
        extra = {"judge": options["judge"]} if judge else {}
        if judge:
            get_judge(options["judge"])  # an unknown judge fails before any video is decoded

        def make(k: int) -> TaskItem:
            index, (path, location, record) = wanted[k]
            sample = reader.sample(path, location, record, index)
            item = video_item(sample, **extra)
            if kind == "multiple-choice":
                meta = {**item.meta, "options": sample.truth["options"]}
                return dataclasses.replace(item, meta=meta)
            question = sample.truth["question"]
            return dataclasses.replace(item, meta={**item.meta, "question_text": question})

        return LazyItems(len(wanted), make, skipped)

    return source


def video_choice_score(prediction: str, item: TaskItem) -> float:
    """1 if the canonical extraction of the option letter gives the right one (``metrics.choice_correct``)."""
    return float(metrics.choice_correct(prediction, item.answers[0], item.meta["options"]))


def judged_score(prediction: str, item: TaskItem) -> float:
    """1 for a yes verdict, else 0 (the item's record; the task's accuracy leaves out no-verdicts)."""
    judge = get_judge(item.meta["judge"])
    return float(judge(item.meta["question_text"], item.answers[0], prediction).correct is True)


def _verdict_word(verdict: JudgeVerdict) -> str:
    """The verdict as ``metrics.judge_aggregate`` counts it: "yes", "no", or neither."""
    if verdict.correct is None:
        return "neither"
    return "yes" if verdict.correct else "no"


def judged_aggregate(
    predictions: Sequence[str], items: Sequence[TaskItem], scores: Sequence[float]
) -> dict[str, float]:
    """ActivityNet-QA's aggregate (``metrics.judge_aggregate``): accuracy = #yes / (#yes + #no) x100,
    also under a key naming the judge (so the fallback is labelled in every result); the number of
    verdicts that were neither yes nor no (``unparsed verdicts``, left out of the accuracy); and the
    mean 0-5 judge score when the judge gives scores."""
    if not items:
        return {"score": 0.0}
    judge = get_judge(items[0].meta["judge"])
    verdicts = [
        judge(i.meta["question_text"], i.answers[0], p) for p, i in zip(predictions, items, strict=True)
    ]
    parsed = [(_verdict_word(v), int(v.score or 0)) for v in verdicts]
    result = metrics.judge_aggregate(parsed)
    out = {
        "score": result["accuracy"],
        f"accuracy [{judge.label}]": result["accuracy"],
        f"unparsed verdicts [{judge.label}]": float(sum(v.correct is None for v in verdicts)),
    }
    if all(v.score is not None for v in verdicts):
        out[f"mean score 0-5 [{judge.label}]"] = result["score"]
    return out


register_task(
    Task(
        name=f"{SYNTH_PREFIX}video",
        category="video",
        version="1",
        description="held-out clips of the video generator (eval split): direction, mover, order",
        prompt="{question}",
        generation=GenerationConfig(max_new_tokens=8),
        parse=short_answer,
        score=normalized_match,
        metric=EXACT,
        source=_synthetic_items(f"{SYNTH_PREFIX}video", ("video",), video_item),
        options=_synth_options(),
    )
)
register_task(
    Task(
        name="video-mc",
        category="video",
        version="1",
        description="multiple-choice video QA (MVBench / NExT-QA / EgoSchema records), answered by letter",
        prompt="{question}",  # the reader's prompt lists the options and asks for the letter
        generation=GenerationConfig(max_new_tokens=8),
        parse=whole_answer,
        score=video_choice_score,
        metric="multiple choice accuracy (canonical letter extraction)",
        source=_video_file_items("video-mc", "multiple-choice"),
        options=_video_options(),
        # Each file its own benchmark unless benchmark= groups several (MVBench's 20 task files), whose
        # score is then the mean of the files' accuracies, as MVBench reports its average.
        split_mean="splits",
    )
)
register_task(
    Task(
        name="video-qa",
        category="video",
        version="1",
        description="open-ended video QA (ActivityNet-QA style records) judged by the judge= option",
        prompt="{question}\n" + SHORT_ANSWER,
        generation=GenerationConfig(max_new_tokens=32),
        parse=short_answer,
        score=judged_score,
        metric=f"judge accuracy (judge=exact-match by default: {FALLBACK_JUDGE_LABEL})",
        source=_video_file_items("video-qa", "open-ended", judge=True),
        options=(
            *_video_options(),
            TaskOption(
                "judge",
                str,
                "the answer judge (register_judge); default: the offline fallback",
                "exact-match",
            ),
        ),
        aggregate=judged_aggregate,
    )
)


# --------------------------------------------------------------------------------------------------
# UI tasks: scorers
# --------------------------------------------------------------------------------------------------


def ground_score(prediction: str, item: TaskItem) -> float:
    """Acc@IoU>=0.5 of the first box in the answer against the target (our text units)."""
    meta = item.meta
    return float(metrics.grounding_hit(prediction, meta["box"], meta["width"], meta["height"]))


def click_score(prediction: str, item: TaskItem) -> float:
    """ScreenSpot: the predicted point (or box centre) lies inside the target box."""
    meta = item.meta
    return float(metrics.screenspot_hit(prediction, meta["box"], meta["width"], meta["height"]))


_BOX_LINE = re.compile(r"[\[\(][^\[\]\(\)]*[\]\)]")


def line_class(line: str) -> str | None:
    """The first UI class named in a listing line (``search icon`` -> icon), or None."""
    lowered = line.lower()
    found = []
    for c in UI_CLASSES:
        # Ranked by the whole-word match's position: "button" inside "Buttons:" is not a mention.
        match = re.search(rf"\b{re.escape(c)}\b", lowered)
        if match:
            found.append((match.start(), c))
    return min(found)[1] if found else None


def ui_list_f1(
    prediction: str, truth: Sequence[tuple[str, Sequence[float]]], width: int, height: int
) -> float:
    """Widget-listing F1 at IoU >= 0.5 with class agreement (module docstring). ``truth`` is
    (class, pixel box) per element; boxes in the prediction are read in our text units."""
    predicted: list[tuple[str | None, tuple[float, float, float, float]]] = []
    for line in prediction.splitlines():
        box = metrics.parse_box(line, width, height)
        if box is not None:
            predicted.append((line_class(line), box))
    if not predicted and not truth:
        return 1.0
    if not predicted or not truth:
        return 0.0
    pairs = sorted(
        (
            (metrics.box_iou(p_box, t_box), i, j)
            for i, (p_cls, p_box) in enumerate(predicted)
            for j, (t_cls, t_box) in enumerate(truth)
            if p_cls == t_cls
        ),
        reverse=True,
    )
    used_p: set[int] = set()
    used_t: set[int] = set()
    for iou, i, j in pairs:
        if iou < 0.5:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return 2 * len(used_p) / (len(predicted) + len(truth))


def list_score(prediction: str, item: TaskItem) -> float:
    meta = item.meta
    return ui_list_f1(prediction, meta["elements"], meta["width"], meta["height"])


# --------------------------------------------------------------------------------------------------
# UI tasks: held-out synthetic screens
# --------------------------------------------------------------------------------------------------


def ui_item(sample: Sample) -> TaskItem:
    """A synthetic UI sample as an item: image size, and the target box of a grounding answer."""
    item = sample_to_item(sample)
    height, width = item.meta["sizes"][0]
    meta: dict[str, Any] = {**item.meta, "width": width, "height": height}
    answer = sample.turns[-1].content
    if answer == "<region0>":  # a grounding sample: the answer is the target's box
        meta["box"] = tuple(sample.regions[0].box)  # type: ignore[arg-type]
    if sample.source.endswith("/ui-list"):
        meta["elements"] = [(e["class"], tuple(e["box"])) for e in sample.truth["elements"]]
    return dataclasses.replace(item, meta=meta)


_UI_SYNTH: tuple[tuple[str, tuple[str, ...], str, Callable[[str, TaskItem], float], str, int], ...] = (
    ("ui-ocr", ("ui-ocr",), "referring: the text at a box", normalized_match, EXACT, 24),
    ("ui-icon", ("ui-icon",), "referring: the icon at a box", normalized_match, EXACT, 8),
    ("ui-widget", ("ui-widget",), "referring: the widget class at a box", normalized_match, EXACT, 8),
    ("ui-find-text", ("ui-find-text",), "grounding: find a text", ground_score, "Acc@IoU>=0.5", 32),
    ("ui-find-icon", ("ui-find-icon",), "grounding: find an icon", ground_score, "Acc@IoU>=0.5", 32),
    ("ui-find-widget", ("ui-find-widget",), "grounding: find a widget", ground_score, "Acc@IoU>=0.5", 32),
    ("ui-list", ("ui-list",), "grounding: list every widget", list_score, "element F1 at IoU>=0.5", 768),
    (
        "ui-click",
        ("ui-find-text", "ui-find-icon", "ui-find-widget"),
        "ScreenSpot-style click on text, icon and widget targets",
        click_score,
        "click accuracy (point or box centre in the target)",
        32,
    ),
)
for _name, _generators, _what, _score, _metric, _budget in _UI_SYNTH:
    register_task(
        Task(
            name=SYNTH_PREFIX + _name,
            category="ui",
            # 2: the screens' text is laid out by Pillow's basic engine (mm15.data.synth.render), where
            # Raqm laid it out on machines that have it: other pixels and text boxes there.
            version="2",
            description=f"held-out synthetic phone / tablet screens (eval split), {_what}",
            prompt="{question}",
            generation=GenerationConfig(max_new_tokens=_budget),
            parse=short_answer if _score is normalized_match else whole_answer,
            score=_score,
            metric=_metric,
            source=_synthetic_items(SYNTH_PREFIX + _name, _generators, ui_item),
            options=_synth_options(),
        )
    )


# --------------------------------------------------------------------------------------------------
# UI tasks: annotated real screenshots (UI-elements JSON)
# --------------------------------------------------------------------------------------------------


def _box(value: Any, where: str, width: int, height: int) -> tuple[float, float, float, float]:
    ok = (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )
    if not ok or not (0 <= value[0] < value[2] <= width and 0 <= value[1] < value[3] <= height):
        raise TaskError(
            f"{where}: a box must be [x1, y1, x2, y2] inside the {width}x{height} image, got {value!r}"
        )
    return float(value[0]), float(value[1]), float(value[2]), float(value[3])


# What each class is named by in questions and answers (the generators' elements): buttons, text
# fields and labels by their text, toggles and checkboxes by their label (or text), icons by name.
_UI_NAMED_BY: dict[str, tuple[str, ...]] = {
    "button": ("text",),
    "text field": ("text",),
    "label": ("text",),
    "toggle": ("label", "text"),
    "checkbox": ("label", "text"),
    "icon": ("name",),
}


def load_ui_elements(path: Path, images: Path | None = None) -> dict[str, Any]:
    """Read and check a UI-elements JSON (module docstring); boxes become tuples of floats.

    With ``images`` (the screenshot folder), the screenshot must be there and be ``width`` x ``height``
    as the model sees it (EXIF-upright): the boxes are pixels of that size and are written as text
    relative to it, so a wrong size would move every reference box without any other sign. It is
    checked before the boxes, whose bounds depend on it.

    Every element's ``text`` / ``label`` / ``name``, when given, must be a non-empty string, and each
    class needs the one it is named by (``_UI_NAMED_BY``): checked here, as a missing or null one
    would otherwise surface as a bare ``KeyError``, a question about ``"None"``, or a crash in scoring
    after the whole task has been generated."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: not a readable UI-elements JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), str):
        raise TaskError(f"{path}: expected an object with 'image', 'width', 'height' and 'elements'")
    width, height = data.get("width"), data.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise TaskError(f"{path}: 'width' and 'height' must be positive integers")
    if images is not None:
        image = images / data["image"]
        if not image.is_file():
            raise TaskError(f"{path}: the screenshot {image} does not exist")
        try:
            actual = image_size(image)  # as the model sees it: EXIF-upright
        except (OSError, ValueError) as err:  # ImageError is a ValueError
            raise TaskError(f"{path}: cannot read the screenshot {image}: {err}") from None
        if actual != (width, height):
            raise TaskError(
                f"{path}: 'width' x 'height' is {width}x{height} but the screenshot {image} is "
                f"{actual[0]}x{actual[1]} (upright, after any EXIF rotation)"
            )
    elements = data.get("elements")
    if not isinstance(elements, list) or not elements:
        raise TaskError(f"{path}: 'elements' must be a non-empty list")
    checked = []
    for k, element in enumerate(elements):
        where = f"{path}: element {k}"
        if not isinstance(element, dict) or element.get("class") not in UI_CLASSES:
            raise TaskError(f"{where}: needs a 'class' in {UI_CLASSES}")
        where = f"{where} ({element['class']})"
        for key in ("text", "label", "name"):
            value = element.get(key)
            if key in element and not (isinstance(value, str) and value.strip()):
                raise TaskError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        needed = _UI_NAMED_BY[element["class"]]
        if not any(key in element for key in needed):
            raise TaskError(f"{where}: a {element['class']} needs a {' or '.join(map(repr, needed))}")
        out = dict(element)
        out["box"] = _box(element.get("box"), where, width, height)
        if "text_box" in element:
            out["text_box"] = _box(element["text_box"], where, width, height)
        checked.append(out)
    return {**data, "elements": checked}


def _describe(element: Mapping[str, Any]) -> str:
    """How an element is named in questions (the generators' wording)."""
    cls = element["class"]
    if cls == "icon":
        return f"{element['name']} icon"
    if cls in ("toggle", "checkbox"):
        return f'{cls} for "{element.get("label", element.get("text"))}"'
    return f'{cls} "{element["text"]}"'


def _unique(
    elements: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], str | None]
) -> tuple[list[int], int]:
    """Indices of elements whose key is set and unique on the screen (so a question has one answer),
    and how many elements had a key shared with another (left out: no single right answer)."""
    keys = [key(e) for e in elements]
    unique = [k for k, value in enumerate(keys) if value is not None and keys.count(value) == 1]
    shared = sum(1 for value in keys if value is not None and keys.count(value) > 1)
    return unique, shared


def _screen_items(kind: str) -> Callable[[Mapping[str, Any]], Sequence[TaskItem]]:
    """The items of one UI task over a UI-elements JSON (one screenshot, several questions)."""

    def source(options: Mapping[str, Any]) -> Sequence[TaskItem]:
        path = Path(options["path"])
        root = Path(options["images"]) if options.get("images") else path.parent
        data = load_ui_elements(path, root)
        image = root / data["image"]
        width, height = data["width"], data["height"]
        elements = data["elements"]

        def region(box: Sequence[float]) -> str:
            return format_box(box, height, width)

        def item(k: int, suffix: str, question: str, answer: str, **meta: Any) -> TaskItem:
            return TaskItem(
                id=f"{path.stem}/{kind}/{k}{suffix}",
                question=question,
                answers=(answer,),
                images=(image,),
                lead="<image>\n",
                meta={"width": width, "height": height, "sizes": [(height, width)], **meta},
            )

        items: list[TaskItem] = []
        if kind == "ocr":
            for k, e in enumerate(elements):
                if "text" in e:
                    box = e.get("text_box", e["box"])
                    items.append(item(k, "", f"What is the text in {region(box)}?", e["text"]))
        elif kind == "icon":
            for k, e in enumerate(elements):
                if e["class"] == "icon":
                    question = f"What is the icon in {region(e['box'])}? Answer with its name."
                    items.append(item(k, "", question, e["name"]))
        elif kind == "widget":
            for k, e in enumerate(elements):
                items.append(item(k, "", WIDGET_QUESTION.format(region=region(e["box"])), e["class"]))
        else:  # ground / click: find text, icon and widget, each target unique on the screen
            texts, shared_texts = _unique(elements, lambda e: e.get("text"))
            for k in texts:
                box = elements[k].get("text_box", elements[k]["box"])
                question = f'Where is the text "{elements[k]["text"]}"?' + GROUND_SUFFIX
                items.append(item(k, "-text", question, region(box), box=box))
            names, shared_names = _unique(elements, lambda e: e.get("name"))
            for k in names:
                question = f"Where is the {elements[k]['name']} icon?" + GROUND_SUFFIX
                items.append(item(k, "-icon", question, region(elements[k]["box"]), box=elements[k]["box"]))
            # Icons are asked by name above, so neither a unique nor a shared icon description counts here.
            widgets = [e if e["class"] != "icon" else {} for e in elements]
            described, shared_widgets = _unique(widgets, lambda e: _describe(e) if e else None)
            for k in described:
                question = f"Where is the {_describe(elements[k])}?" + GROUND_SUFFIX
                items.append(item(k, "-widget", question, region(elements[k]["box"]), box=elements[k]["box"]))
            return ItemList(items, {"not_unique": shared_texts + shared_names + shared_widgets})
        return items

    return source


_UI_FILE_OPTIONS = (
    TaskOption("path", Path, "a UI-elements JSON (one annotated screenshot)", required=True),
    TaskOption("images", Path, "the screenshot folder (default: the JSON's folder)"),
)
for _name, _kind, _what, _score, _metric, _parse, _budget in (
    ("ui-ocr", "ocr", "referring: the text at a box", normalized_match, EXACT, short_answer, 24),
    ("ui-icon", "icon", "referring: the icon at a box", normalized_match, EXACT, short_answer, 8),
    ("ui-widget", "widget", "referring: the widget class at a box", normalized_match, EXACT, short_answer, 8),
    (
        "ui-ground",
        "ground",
        "grounding: find text, icon, widget",
        ground_score,
        "Acc@IoU>=0.5",
        whole_answer,
        32,
    ),
    (
        "ui-click",
        "click",
        "ScreenSpot-style click on text, icon and widget targets",
        click_score,
        "click accuracy (point or box centre in the target)",
        whole_answer,
        32,
    ),
):
    register_task(
        Task(
            name=_name,
            category="ui",
            version="1",
            description=f"annotated real screenshot (UI-elements JSON), {_what}",
            prompt="{question}",
            generation=GenerationConfig(max_new_tokens=_budget),
            parse=_parse,
            score=_score,
            metric=_metric,
            source=_screen_items(_kind),
            options=_UI_FILE_OPTIONS,
        )
    )
