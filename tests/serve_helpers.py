"""Shared pieces of the serving tests: a small model that answers varied text, scripted answers, images."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset


def build_test_model(path: Path) -> Path:
    """The tiny preset with larger random LLM weights, saved to ``path``.

    At the default initialisation (std 0.02) the tiny model answers every prompt with the same
    repeated byte, which would make "each request gets its own answer" untestable; std 0.1 gives
    varied answers that still cost nothing to compute.
    """
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).eval()
    with torch.no_grad():
        for parameter in model.llm.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


@contextmanager
def scripted_answer(model: MM15Model, answer: str) -> Iterator[None]:
    """Make greedy generation spell ``answer`` then end, through the real decoding loop.

    The logits of the prefill and of every decoding step are replaced by a one-hot on the scripted
    token for that step, so streaming, stop handling and batching all run as usual.
    """
    tokenizer = model.tokenizer
    script = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prefill, step_forward = model.forward, model.llm.forward
    state = {"step": 0}

    def one_hot(logits: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(logits, -1e4)
        forced[..., script[min(state["step"], len(script) - 1)]] = 0.0
        return forced

    def scripted_prefill(*args: Any, **kwargs: Any) -> Any:
        out = prefill(*args, **kwargs)
        state["step"] = 0
        out.logits = one_hot(out.logits)
        return out

    def scripted_step(*args: Any, **kwargs: Any) -> Any:
        out = step_forward(*args, **kwargs)
        state["step"] += 1
        out.logits = one_hot(out.logits)
        return out

    model.forward = scripted_prefill  # type: ignore[method-assign]
    model.llm.forward = scripted_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward
        del model.llm.forward


def png_bytes(width: int = 96, height: int = 64, color: tuple[int, int, int] = (30, 160, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
