"""Generation for ``MM15Model``: KV cache, greedy and sampling, stop strings, left-padded batches, streaming.

The prompt (with its image features) is prefilled once; every later step feeds only the new token
and reuses the cache. Left padding keeps every row's last prompt token in the last column, and the
position ids count only real tokens, so a padded row decodes exactly as it would alone. A row stops at
a stop token (``mm15.chat.stop_token_ids``: the tokenizer's and the LLM's end-of-sequence tokens and
the chat template's end-of-turn token) or when its text reaches a stop string (cut before the stop).
``stream`` yields each row's new text as it is produced; ``generate`` collects it.
``continuation_logprobs`` scores a given continuation instead of generating one (likelihood-based
multiple choice, diagnostics).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mm15.boxes import Box, Point, parse_boxes, parse_points
from mm15.chat import stop_token_ids
from mm15.checks import is_int
from mm15.model.mm15 import (
    IMAGE_TOKEN,
    MM15Model,
    escape_special_tokens,
    special_token_strings,
    text_token_ids,
)


@dataclass(frozen=True)
class GenerationConfig:
    """``temperature == 0`` is greedy; otherwise softmax sampling with optional top-k / top-p.

    ``stop`` takes a sequence of non-empty strings, or one string (as OpenAI's ``stop`` does); it is kept
    as a tuple.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] | str = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        # Types first: a float count or a string from a request failed deep in torch or in a comparison.
        for name in ("max_new_tokens", "top_k"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"GenerationConfig.{name} must be an integer, got {getattr(self, name)!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"GenerationConfig.seed must be an integer or None, got {self.seed!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"GenerationConfig.{name} must be a number, got {value!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails both
            raise ValueError(
                f"GenerationConfig.temperature must be a finite number >= 0, got {self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"GenerationConfig.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        # A bare string was once iterated character by character: any single letter of it stopped.
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise ValueError(
                f"GenerationConfig.stop must be a string or a sequence of strings, got {self.stop!r}"
            )
        if any(not s for s in stop):
            raise ValueError("GenerationConfig.stop must not contain empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            raise ValueError(f"GenerationConfig.seed must be in [-2**63, 2**64), got {self.seed}")


def pick_next_token(
    logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from (rows, vocab) logits."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    # The largest logit moved to 0 first: a tiny temperature (1e-40) then sends the others to -inf
    # (nearly greedy) instead of every logit to +-inf, whose softmax is NaN.
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def special_stop_ids(tokenizer: Any, stops: Sequence[str]) -> frozenset[int]:
    """The ids of the stop strings that are one special token each (ChatML's "<|im_start|>"): the text
    the stop check reads is decoded without special tokens, so generating the token is the stop."""
    special = special_token_strings(tokenizer)
    return frozenset(int(tokenizer.convert_tokens_to_ids(s)) for s in stops if s in special)


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def visible_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The part of ``text`` safe to show, and whether a stop string ended it.

    Held back: an incomplete UTF-8 character at the end, and an ending that could be the start of a
    stop string (it is shown once the next tokens prove it is not).
    """
    text, stopped = cut_at_stop(text, stops)
    if stopped:
        return text, True
    text = text.rstrip("\ufffd")
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - held], False


@torch.no_grad()
def stream(
    model: MM15Model, batch: dict[str, Any], cfg: GenerationConfig | None = None
) -> Iterator[list[str]]:
    """Yield, after every decoding step, the text each row added (an empty string once a row is done).

    ``batch`` comes from ``MM15Processor`` with ``padding_side="left"``.
    """
    cfg = cfg or GenerationConfig()
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    empty = [row for row, length in enumerate(attention_mask.sum(-1).tolist()) if length == 0]
    if empty:
        raise ValueError(f"prompt {empty[0]} of the batch has no tokens: generation needs at least one")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generation needs left-padded prompts (MM15Processor(..., padding_side='left'))")
    tokenizer = model.tokenizer
    stops = stop_token_ids(tokenizer, model.llm) | special_stop_ids(tokenizer, cfg.stop)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    rows = input_ids.shape[0]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids,
        attention_mask,
        batch.get("pixel_values"),
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.past_key_values, out.logits[:, -1]
    generated: list[list[int]] = [[] for _ in range(rows)]
    shown = [""] * rows
    done = [False] * rows

    def final_text(row: int) -> str:
        return cut_at_stop(tokenizer.decode(generated[row], skip_special_tokens=True), cfg.stop)[0]

    for step in range(cfg.max_new_tokens):
        token = pick_next_token(logits, cfg, generator)
        deltas = []
        for row in range(rows):
            if done[row]:
                deltas.append("")
                continue
            if int(token[row]) in stops:
                done[row] = True
                deltas.append(final_text(row)[len(shown[row]) :])  # release anything held back
                continue
            generated[row].append(int(token[row]))
            visible, done[row] = visible_text(
                tokenizer.decode(generated[row], skip_special_tokens=True), cfg.stop
            )
            delta = visible[len(shown[row]) :] if visible.startswith(shown[row]) else ""
            shown[row] += delta
            deltas.append(delta)
        yield deltas
        if all(done) or step == cfg.max_new_tokens - 1:
            break  # no forward pass for a token that will never be chosen
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model.llm(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        cache, logits = out.past_key_values, out.logits[:, -1]
    # Rows cut by max_new_tokens: release what was held back for a stop string that never came.
    tail = ["" if done[row] else final_text(row)[len(shown[row]) :] for row in range(rows)]
    if any(tail):
        yield tail


def generate(model: MM15Model, batch: dict[str, Any], cfg: GenerationConfig | None = None) -> list[str]:
    """The full generated text of every row."""
    texts = [""] * batch["input_ids"].shape[0]
    for deltas in stream(model, batch, cfg):
        texts = [text + delta for text, delta in zip(texts, deltas, strict=True)]
    return texts


@torch.no_grad()
def continuation_logprobs(
    model: MM15Model, processor: Any, prompt: str, images: Sequence[Any], continuation: str
) -> tuple[torch.Tensor, bool]:
    """log p of each token of ``continuation`` after ``prompt`` (float32, one per token), and whether
    greedy decoding would produce exactly those tokens.

    ``processor`` is the ``MM15Processor`` for the prompt's images. The continuation is tokenised on its
    own, so the prompt's tokens are exactly the ones generation would see and no merge crosses the
    boundary. An empty continuation gives an empty tensor (which greedy decoding trivially produces).
    """
    from mm15.hardware import autocast

    # As every text is: a special-token string in it stays text, the image token is refused.
    image_token_id = model.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    escaped = escape_special_tokens(continuation, model.tokenizer)
    cont = text_token_ids(escaped, model.tokenizer, image_token_id)
    if not cont:
        return torch.zeros(0), True
    device = next(model.parameters()).device
    batch = processor([prompt], [list(images)], padding_side="right")
    prompt_ids = batch["input_ids"]
    if prompt_ids.shape[1] == 0:
        raise ValueError("the prompt has no tokens: a continuation needs at least one token to follow")
    input_ids = torch.cat([prompt_ids, torch.tensor([cont], dtype=torch.long)], dim=1).to(device)
    pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
    with autocast():
        logits = model(input_ids, torch.ones_like(input_ids), pixel_values).logits
    # Position t predicts token t + 1: the continuation is predicted from the last prompt token on.
    start = prompt_ids.shape[1]
    predicting = logits[0, start - 1 : input_ids.shape[1] - 1].float().log_softmax(-1)
    targets = input_ids[0, start:]
    greedy = bool((predicting.argmax(-1) == targets).all())
    return predicting.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu(), greedy


def parse_grounding(text: str, height: int, width: int) -> dict[str, list[Box] | list[Point]]:
    """Boxes and points in generated text, in the original image's pixels (``mm15.boxes`` format)."""
    return {"boxes": parse_boxes(text, height, width), "points": parse_points(text, height, width)}
