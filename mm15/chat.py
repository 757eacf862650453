"""Samples -> token ids and labels: the chat template, image spans, regions as text, and the length budget.

``ChatEncoder.encode(sample, image_sizes)`` turns a ``Sample`` into ``input_ids`` and ``labels``:

* **Template.** SFT categories are rendered with the LLM's own chat template (SmolLM2's ChatML), or
  ``FALLBACK_CHAT_TEMPLATE`` when the tokenizer has none. Pre-training categories (caption,
  interleaved, text, ocr) are a plain stream: the turns' contents joined by newlines, then the
  end-of-sequence token.
* **Labels.** Only assistant text is learned: in the template, the assistant's content and its
  end-of-turn marker, not the role header; in the plain stream, the assistant turns and the final
  end-of-sequence token. Everything else, and every image span, is -100.
* **Images.** Each ``<image>`` becomes its plan's span, built by ``mm15.model.mm15.image_span_ids`` as
  inference builds it (tile markers as text, ``tokens_per_tile`` image tokens per tile); text pieces
  are tokenised separately, so no merge crosses a span.
* **Regions.** ``<regionK>`` is written with ``mm15.boxes`` from the region's pixels and its image's
  size: ``[x1, y1, x2, y2]`` or ``[x, y]``.
* **Budget.** Image tokens are counted first, from the plans alone; a sample longer than
  ``max_length`` raises ``SampleTooLong`` (the data pipeline drops and counts it). Nothing is ever
  truncated, so no image span is ever cut.

``stop_token_ids`` gives the tokens generation and serving stop at: eos, and the template's end-of-turn
token that training supervises (not always eos: Llama 3's ``<|eot_id|>``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mm15.boxes import format_box, format_point
from mm15.data.sample import IMAGE_PLACEHOLDER, REGION_PATTERN, Sample
from mm15.geometry import ImagePlanConfig, TilePlan, plan_image
from mm15.model.mm15 import IMAGE_TOKEN, escape_special_tokens, image_span_ids, text_token_ids

IGNORE = -100
# Stands for a turn's content when its rendering is searched for where the content begins (Unicode
# private-use characters: no tokenizer's template or real text carries them).
CONTENT_MARK = "\ue000mm15-content\ue000"
# Categories trained as a plain stream (MM1.5's pre-training and OCR continual pre-training data).
PLAIN_CATEGORIES = frozenset({"caption", "interleaved", "text", "ocr"})
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The fallback template's turn markers: ``mm15.model.mm15.add_chat_tokens`` makes them special tokens of a
# tokenizer that has no template of its own, so a turn ends with one token generation can stop at.
FALLBACK_TURN_TOKENS = ("<|im_start|>", "<|im_end|>")


def chat_template(tokenizer: Any) -> str:
    """The template conversations are rendered with: the tokenizer's own, or ``FALLBACK_CHAT_TEMPLATE``."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def _is_special(tokenizer: Any, token_id: int) -> bool:
    if token_id in tokenizer.all_special_ids:
        return True
    # Llama 3 lists <|eot_id|> only among its added tokens (special=True), not as a named special token.
    added = (getattr(tokenizer, "added_tokens_decoder", None) or {}).get(token_id)
    return bool(getattr(added, "special", False))


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The token the chat template ends an assistant turn with, when it is one special token (SmolLM2's
    and Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``); None when the turn ends with plain text.

    Found as ``ChatEncoder`` finds turn boundaries: a one-turn conversation is rendered with a marker as
    the assistant's content, and the first token after the marker is the one training supervises.
    """
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": CONTENT_MARK}]
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=chat_template(tokenizer), tokenize=False
        )
    except Exception:  # a template that refuses this conversation: no marker to stop at, only eos
        return None
    if not isinstance(text, str) or text.count(CONTENT_MARK) != 1:
        return None
    tail = text[text.index(CONTENT_MARK) + len(CONTENT_MARK) :].lstrip()
    first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1] if tail else []
    return int(first[0]) if first and _is_special(tokenizer, int(first[0])) else None


def stop_token_ids(tokenizer: Any, llm: Any = None) -> frozenset[int]:
    """The tokens that end an answer: the tokenizer's eos, the LLM's ``generation_config`` eos ids (an
    id or a list; Llama 3 Instruct lists several), and the chat template's end-of-turn token.

    Generation (``mm15.model.generate``) and serving (``mm15.serve.engine``) both stop at these. The
    end-of-turn token is what ``ChatEncoder`` supervises at the end of every assistant turn; it differs
    from eos for e.g. Llama 3 (``<|eot_id|>`` vs ``<|end_of_text|>``) and Qwen2.5 base (``<|im_end|>``
    vs ``<|endoftext|>``).
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured if isinstance(i, int))
    turn_end = end_of_turn_token_id(tokenizer)
    if turn_end is not None:
        ids.add(turn_end)
    return frozenset(ids)


class SampleTooLong(ValueError):
    """The sample needs ``needed`` tokens but the budget is ``budget``; it is dropped, never cut."""

    def __init__(self, sample_id: str, needed: int, budget: int, what: str) -> None:
        super().__init__(f"sample {sample_id}: {what} need {needed} tokens, over the budget of {budget}")
        self.sample_id = sample_id
        self.needed = needed
        self.budget = budget
        self.what = what

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields (and notes), so it crosses processes (the data worker) as itself.
        return type(self), (self.sample_id, self.needed, self.budget, self.what), self.__dict__


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    plans: list[TilePlan]
    sample_id: str
    source: str
    category: str

    @property
    def num_image_tokens(self) -> int:
        return sum(plan.num_image_tokens for plan in self.plans)

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def render_regions(text: str, sample: Sample, image_sizes: Sequence[tuple[int, int]]) -> str:
    """Replace every ``<regionK>`` with its box or point in the text format of ``mm15.boxes``."""

    def write(match: Any) -> str:
        region = sample.regions[int(match.group(1))]
        height, width = image_sizes[region.image]
        if region.box is not None:
            return format_box(region.box, height, width)
        return format_point(region.point, height, width)  # type: ignore[arg-type]

    return REGION_PATTERN.sub(write, text)


class ChatEncoder:
    """Encodes samples for one tokenizer, image plan and length budget (module docstring)."""

    def __init__(self, tokenizer: Any, plan_cfg: ImagePlanConfig, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.plan_cfg = plan_cfg
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: build the model (MM15Model) first")
        self.template = chat_template(tokenizer)

    def plans(self, sample: Sample, image_sizes: Sequence[tuple[int, int]]) -> list[TilePlan]:
        if len(image_sizes) != len(sample.images):
            raise ValueError(f"sample {sample.id}: {len(sample.images)} images but {len(image_sizes)} sizes")
        # Video frames are never split (MM1.5-Video): each frame is one tile.
        cfg = dataclasses.replace(self.plan_cfg, split=False) if sample.is_video else self.plan_cfg
        return [
            plan_image(h, w, cfg, image_index=k, images_in_sample=len(image_sizes))
            for k, (h, w) in enumerate(image_sizes)
        ]

    def _segments(self, sample: Sample, image_sizes: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
        """The sample as (text, supervised) pieces, before image expansion and tokenisation."""
        # Contents are escaped: a special-token string a text mentions stays text (escape_special_tokens).
        turns = [
            (t.role, escape_special_tokens(render_regions(t.content, sample, image_sizes), self.tokenizer))
            for t in sample.turns
        ]
        if sample.category in PLAIN_CATEGORIES:
            pieces: list[tuple[str, bool]] = []
            for i, (role, content) in enumerate(turns):
                pieces.append((content, role == "assistant"))
                if i < len(turns) - 1:
                    pieces.append(("\n", False))
            pieces.append((self.tokenizer.eos_token or "", True))
            return pieces
        messages = [{"role": role, "content": content} for role, content in turns]

        def render(conversation: list[dict[str, str]]) -> str:
            if not conversation:
                return ""
            template = self.template
            return self.tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)

        def head_of(i: int) -> str:
            """The rendering up to turn ``i``'s content: where its supervised text begins. Found by rendering
            a marker as the content, not from ``add_generation_prompt``: a first turn has no earlier
            rendering to extend, and the template may put a default system prompt before it."""
            text = render([*messages[:i], {"role": messages[i]["role"], "content": CONTENT_MARK}])
            if text.count(CONTENT_MARK) != 1 or CONTENT_MARK in messages[i]["content"]:
                raise ValueError(f"sample {sample.id}: cannot find where turn {i}'s content begins")
            return text[: text.index(CONTENT_MARK)]

        pieces, done = [], ""
        for i, (role, _) in enumerate(turns):
            head = head_of(i) if role == "assistant" else done
            full = render(messages[: i + 1])
            if not (head.startswith(done) and full.startswith(head)):
                raise ValueError(
                    f"sample {sample.id}: the chat template does not render conversations prefix by prefix, "
                    "so assistant spans cannot be located"
                )
            pieces.append((head[len(done) :], False))
            pieces.append((full[len(head) :], role == "assistant"))
            done = full
        return [(text, supervised) for text, supervised in pieces if text]

    def encode(self, sample: Sample, image_sizes: Sequence[tuple[int, int]]) -> EncodedSample:
        """Token ids and labels of ``sample`` whose images have these (height, width) sizes."""
        sample.validate()
        plans = self.plans(sample, image_sizes)
        image_tokens = sum(plan.num_image_tokens for plan in plans)
        if image_tokens > self.max_length:
            raise SampleTooLong(sample.id, image_tokens, self.max_length, f"its {len(plans)} images alone")
        ids: list[int] = []
        labels: list[int] = []
        next_plan = iter(plans)
        for text, supervised in self._segments(sample, image_sizes):
            parts = text.split(IMAGE_PLACEHOLDER)
            for index, part in enumerate(parts):
                if index > 0:
                    span = image_span_ids(next(next_plan), self.tokenizer, self.image_token_id)
                    ids += span
                    labels += [IGNORE] * len(span)
                if part:
                    tokens = text_token_ids(part, self.tokenizer, self.image_token_id)
                    ids += tokens
                    labels += tokens if supervised else [IGNORE] * len(tokens)
        if len(ids) > self.max_length:
            raise SampleTooLong(sample.id, len(ids), self.max_length, "its text and images")
        return EncodedSample(ids, labels, plans, sample.id, sample.source, sample.category)
