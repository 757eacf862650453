"""The serving engine: one background thread runs the model on batches of concurrent requests.

Callers turn a prompt and its images into token ids and tiles with ``Engine.encode`` (on their own
thread, so the engine thread only runs the model) and hand them to ``Engine.submit``, which returns a
``RequestHandle``. The engine thread batches continuously: when idle it takes the oldest waiting
requests (up to ``max_batch``, after ``batch_window_s`` for more to arrive) and prefills them
together, left-padded; between decoding steps, requests that arrived meanwhile are prefilled and join
the running batch (their KV caches and masks left-padded to a common length), and finished or
cancelled rows leave it (with the padding columns no remaining row needs, so the batch is never wider
than its longest live row). After every step each row's new text goes to its own handle, read with
``events()`` (threads) or ``aevents()`` (asyncio).

Each row keeps its own ``GenerationConfig``: its token budget, stop strings, temperature and seed.
Tokens are chosen, and stop tokens (``mm15.chat.stop_token_ids``) and stop strings applied, with
``mm15.model.generate``'s own rules, and left padding with real-token position ids keeps a row's
greedy answer equal to ``generate()`` on it alone. A seeded row samples from its own generator, so
its answer does not depend on the other rows of its batch.

Image handling is one function, ``encode_prompt``: a video arrives as its sampled frames with
``video=True``, which plans every image of the prompt as one unsplit tile (MM1.5-Video), and the
batching is unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from mm15.chat import stop_token_ids
from mm15.geometry import TilePlan, plan_image
from mm15.hardware import autocast, fast_dtype
from mm15.model.generate import (
    GenerationConfig,
    cut_at_stop,
    pick_next_token,
    special_stop_ids,
    visible_text,
)
from mm15.model.mm15 import IMAGE_PLACEHOLDER, MM15Model, MM15Processor, tokenize_with_images

log = logging.getLogger("mm15.serve")

FinishReason = Literal["stop", "length"]


class PromptTooLong(ValueError):
    """The prompt (text and image tokens) needs ``needed`` tokens, over ``limit``."""

    def __init__(self, needed: int, limit: int) -> None:
        super().__init__(
            f"the prompt needs {needed} tokens (text and image tokens) but the limit is {limit}; "
            "send fewer or smaller images, or a shorter conversation"
        )
        self.needed = needed
        self.limit = limit


class EngineBusy(RuntimeError):
    """Too many requests are already waiting."""


class EngineStopped(RuntimeError):
    """The engine is not running (not started, or shut down)."""


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt ready for the model: token ids (image spans expanded) and its tiles in order."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def plan_images(
    processor: MM15Processor, prompt: str, images: Sequence[Image.Image], video: bool = False
) -> list[TilePlan]:
    """Each image's tile plan; with ``video`` none is split, as ``ChatEncoder`` plans ``is_video`` samples.

    MM1.5 already leaves samples of 3 or more images unsplit, but a clip of 1-2 frames would otherwise
    be split like 1-2 photos, which MM1.5-Video never trained on (the evaluation runner does the same).
    """
    if not video:
        return processor.plan(prompt, images)
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != len(images):
        raise ValueError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
    unsplit = dataclasses.replace(processor.plan_cfg, split=False)
    return [
        plan_image(image.height, image.width, unsplit, image_index=k, images_in_sample=len(images))
        for k, image in enumerate(images)
    ]


def encode_prompt(
    processor: MM15Processor,
    image_token_id: int,
    prompt: str,
    images: Sequence[Image.Image],
    max_tokens: int | None = None,
    tokenizer_lock: contextlib.AbstractContextManager[Any] | None = None,
    *,
    video: bool = False,
) -> EncodedPrompt:
    """The one place request images become model inputs: plans, token ids, then tiles.

    ``video`` marks the images as a video's frames: each is planned as one unsplit tile
    (``plan_images``). The token count is checked before tiles are built, so an over-long prompt
    costs no pixel work. The image-token count is checked against the plans: text that smuggles the
    image token in would otherwise give the batch more image positions than features and fail every
    row with it.
    ``tokenizer_lock`` is held while tokenising only, not while the tiles are computed.
    """
    plans = plan_images(processor, prompt, images, video)
    with tokenizer_lock or contextlib.nullcontext():
        ids = tokenize_with_images(prompt, plans, processor.tokenizer, image_token_id)
    if max_tokens is not None and len(ids) > max_tokens:
        raise PromptTooLong(len(ids), max_tokens)
    pixel_values = processor.images(list(images), plans).pixel_values if images else None
    return EncodedPrompt(ids, pixel_values)


@dataclass(frozen=True)
class Event:
    """What a handle receives: ``delta`` text, then one ``done`` (or ``error``)."""

    kind: Literal["delta", "done", "error"]
    text: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestHandle:
    """A submitted request: its events arrive in order; ``cancel()`` frees its batch row."""

    def __init__(
        self,
        request_id: int,
        prompt: EncodedPrompt,
        config: GenerationConfig,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.config = config
        self.submitted = time.monotonic()
        self.cancelled = threading.Event()
        self._loop = loop
        self._async_events: asyncio.Queue[Event] | None = asyncio.Queue() if loop is not None else None
        self._events: queue.Queue[Event] = queue.Queue()

    def cancel(self) -> None:
        """The client has gone: stop producing tokens for it (its row is skipped from now on)."""
        self.cancelled.set()

    def deliver(self, event: Event) -> None:
        """Called by the engine thread."""
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)  # type: ignore[union-attr]
        except RuntimeError:  # the client's event loop has closed: nobody is listening any more
            self.cancel()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until ``done`` or ``error`` (for callers on threads; needs ``loop=None`` at submit)."""
        if self._loop is not None:
            raise RuntimeError("this handle delivers to an event loop: use aevents()")
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.kind != "delta":
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """Events until ``done`` or ``error`` (for asyncio callers; needs the loop at submit)."""
        if self._async_events is None:
            raise RuntimeError("this handle delivers to a queue: use events()")
        while True:
            event = await self._async_events.get()
            yield event
            if event.kind != "delta":
                return


@dataclass
class EngineStats:
    """Counters for /health, the load benchmark and the batching tests.

    ``batch_sizes`` counts decoding steps by how many rows they decoded together; ``prefills`` counts
    the forward passes over new prompts (requests arriving together share one).
    """

    requests: int = 0
    prefills: int = 0
    decode_steps: int = 0
    rows_decoded: int = 0
    largest_batch: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    generated_tokens: int = 0
    failed_batches: int = 0
    cancelled: int = 0  # rows dropped because their client left

    @property
    def mean_batch(self) -> float:
        return self.rows_decoded / self.decode_steps if self.decode_steps else 0.0


@dataclass
class _Row:
    handle: RequestHandle
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    shown: str = ""
    done: bool = False
    stop_ids: frozenset[int] = frozenset()  # the engine's stop tokens and the request's special-token stops


@dataclass
class _Running:
    """The batch being decoded: its rows, KV cache, mask, each row's last position, next-token logits."""

    rows: list[_Row]
    cache: Any
    attention_mask: torch.Tensor
    last_positions: torch.Tensor
    logits: torch.Tensor


def _joinable(cache: Any) -> bool:
    """New rows can join a running batch only with plain dynamic caches (tensors we know how to pad)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _drop_unused_columns(cache: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns that no row of the batch attends to, from the mask and the KV cache.

    When rows leave, the padding that lined the others up with them stays; as each step adds a column
    and joining rows are padded to the batch's width, a batch that never empties would otherwise grow
    by one column per step, without bound. Positions are per row, so dropping masked columns changes
    no row's answer. Only plain dynamic caches (``_joinable``) whose length matches the mask are
    trimmed; the trimmed mask is returned.
    """
    used = attention_mask.any(dim=0)
    if attention_mask.shape[1] == 0 or bool(used[0]) or not bool(used.any()) or not _joinable(cache):
        return attention_mask
    width = attention_mask.shape[1]
    if any(layer.keys.shape[-2] != width or layer.values.shape[-2] != width for layer in cache.layers):
        return attention_mask
    first = int(used.to(torch.int8).argmax())
    for layer in cache.layers:
        layer.keys = layer.keys[..., first:, :]
        layer.values = layer.values[..., first:, :]
    return attention_mask[:, first:]


class Engine:
    """Owns the model; ``start()`` launches the batching thread, ``close()`` stops it."""

    def __init__(
        self,
        model: MM15Model,
        *,
        max_batch: int = 8,
        batch_window_s: float = 0.01,
        max_waiting: int = 256,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.processor = MM15Processor.for_model(model)
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.max_waiting = max_waiting
        self.stats = EngineStats()
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self._stop_ids = stop_token_ids(self.tokenizer, model.llm)  # as mm15.model.generate stops
        self._pad = pad if pad is not None else (eos if eos is not None else 0)
        # Fast tokenizers are not safe to call from two threads at once ("Already borrowed"): request
        # threads encode while the engine thread decodes, so every tokenizer call takes this lock.
        self.tokenizer_lock = threading.Lock()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._condition = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._dtype = torch.float32  # the compute dtype, settled by start()
        self._stopping = False

    @property
    def context_length(self) -> int | None:
        """The LLM's position limit (prompt plus answer), when its config states one."""
        value = getattr(self.model.llm.config, "max_position_embeddings", None)
        return int(value) if value else None

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    # --- callers' side ------------------------------------------------------------------------------

    def encode(
        self,
        prompt: str,
        images: Sequence[Image.Image],
        max_tokens: int | None = None,
        *,
        video: bool = False,
    ) -> EncodedPrompt:
        """``encode_prompt`` with this model's processor, safe to call from any thread."""
        return encode_prompt(
            self.processor,
            self.model.image_token_id,
            prompt,
            images,
            max_tokens,
            self.tokenizer_lock,
            video=video,
        )

    def submit(
        self,
        prompt: EncodedPrompt,
        config: GenerationConfig,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request; with ``loop`` its events go to that asyncio loop (``aevents``)."""
        if not prompt.input_ids:
            # Refused here, not in the engine thread, where it would fail the whole decoding batch.
            raise ValueError("the prompt has no tokens")
        handle = RequestHandle(next(self._ids), prompt, config, loop)
        with self._condition:
            if self._thread is None or self._stopping:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting; try again shortly")
            self._waiting.append(handle)
            self.stats.requests += 1
            self._condition.notify_all()
        return handle

    def start(self) -> Engine:
        """Start the engine thread. The compute dtype is settled here, on the caller's thread, so a bad
        setting (``MM15_DTYPE``) is an error for the caller instead of a dead thread that never answers."""
        dtype = fast_dtype()
        with self._condition:
            if self._thread is not None:
                return self
            self._stopping = False
            self._dtype = dtype
            self._thread = threading.Thread(target=self._serve_forever, name="mm15-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current decoding step; unfinished and waiting requests get an error event."""
        with self._condition:
            self._stopping = True
            thread, self._thread = self._thread, None
            self._condition.notify_all()
        if thread is not None:
            thread.join(timeout)
        with self._condition:
            left, self._waiting = list(self._waiting), collections.deque()
        for handle in left:
            handle.deliver(Event("error", text="the server is shutting down"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the engine thread --------------------------------------------------------------------------

    def _take(self, limit: int, wait: bool) -> list[RequestHandle]:
        """Up to ``limit`` waiting requests; with ``wait``, block for the first and the batch window."""
        with self._condition:
            if wait:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                # Requests sent together reach the queue a few milliseconds apart: wait briefly so they
                # share one prefill instead of the first running alone.
                deadline = time.monotonic() + self.batch_window_s
                while len(self._waiting) < limit and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
            if self._stopping:
                return []
            taken = []
            while self._waiting and len(taken) < limit:
                handle = self._waiting.popleft()
                if handle.cancelled.is_set():
                    self.stats.cancelled += 1  # its client left while it waited
                else:
                    taken.append(handle)
            return taken

    def _fail(self, handles: Sequence[RequestHandle], what: str) -> None:
        log.exception("generation failed (%s) for %d requests", what, len(handles))
        self.stats.failed_batches += 1
        for handle in handles:
            handle.deliver(Event("error", text="internal error while generating"))

    def _serve_forever(self) -> None:
        """Prefill new requests, join them to the running batch, decode a step; repeat.

        The whole loop runs inside one autocast region. Autocast keeps the bf16 copies of the weights it
        makes only until its outermost region ends, so a region per step (as ``_prefill`` and ``_step``
        open on their own) cast every weight again for every token: on SmolLM2 a decoding step took
        about 95 ms that way against 57 ms with the casts kept (a throwaway timing, AMD EPYC with
        AVX512-BF16). The values are the same either way: the cast of a weight does not change. The
        copies (half the weights' size in bf16) live as long as the engine thread, so the weights must
        not change while it runs (autocast would keep using the old copies); the server never changes
        them.
        """
        with autocast(self._dtype):
            self._loop()

    def _loop(self) -> None:
        running: _Running | None = None
        while True:
            if running is None:
                handles = self._take(self.max_batch, wait=True)
            elif len(running.rows) < self.max_batch and _joinable(running.cache):
                handles = self._take(self.max_batch - len(running.rows), wait=False)
            else:
                handles = []
            if self._stopping:
                for row in running.rows if running else []:
                    row.handle.deliver(Event("error", text="the server is shutting down"))
                return
            try:
                if handles:
                    joining = self._prefill(handles)
                    running = joining if running is None else self._merge(running, joining)
            except Exception:  # one bad prefill must not stop the server; running rows go on
                self._fail(handles, "prefill")
            if running is None:
                continue
            try:
                running = self._step(running)
            except Exception:
                self._fail([row.handle for row in running.rows if not row.done], "decoding")
                running = None

    def _collate(self, rows: Sequence[_Row]) -> dict[str, Any]:
        """Left-padded ids and mask; tiles concatenated in row order (the order ``embed`` fills)."""
        width = max(row.handle.prompt.num_tokens for row in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids = row.handle.prompt.input_ids
            input_ids[index, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[index, width - len(ids) :] = 1
        tiles = [row.handle.prompt.pixel_values for row in rows if row.handle.prompt.pixel_values is not None]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat(tiles) if tiles else None,
        }

    def _decode(self, tokens: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        """Release text held back for a stop string that never came, then close the row."""
        final = cut_at_stop(self._decode(row.generated), row.handle.config.stop)[0]
        if final.startswith(row.shown) and len(final) > len(row.shown):
            row.handle.deliver(Event("delta", text=final[len(row.shown) :]))
        row.done = True
        self.stats.generated_tokens += len(row.generated)
        row.handle.deliver(
            Event(
                "done",
                finish_reason=reason,
                prompt_tokens=row.handle.prompt.num_tokens,
                completion_tokens=len(row.generated),
            )
        )

    def _advance(self, row: _Row, token: int) -> None:
        """Apply one chosen token to a row, as ``mm15.model.generate.stream`` does."""
        config = row.handle.config
        if token in row.stop_ids:
            self._finish(row, "stop")
            return
        row.generated.append(token)
        visible, stopped = visible_text(self._decode(row.generated), config.stop)
        if visible.startswith(row.shown) and len(visible) > len(row.shown):
            row.handle.deliver(Event("delta", text=visible[len(row.shown) :]))
            row.shown = visible
        if stopped:
            self._finish(row, "stop")
        elif len(row.generated) >= config.max_new_tokens:
            self._finish(row, "length")

    @torch.no_grad()
    def _prefill(self, handles: list[RequestHandle]) -> _Running:
        """One forward pass over the new prompts, left-padded together; their next-token logits."""
        self.stats.prefills += 1
        rows = [
            _Row(
                h,
                torch.Generator().manual_seed(h.config.seed) if h.config.seed is not None else None,
                stop_ids=self._stop_ids | special_stop_ids(self.tokenizer, h.config.stop),
            )
            for h in handles
        ]
        batch = self._collate(rows)
        attention_mask = batch["attention_mask"]
        # Positions count real tokens only, so a padded row sees the positions it would see alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(self._dtype):
            out = self.model(
                batch["input_ids"],
                attention_mask,
                batch["pixel_values"],
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
        return _Running(rows, out.past_key_values, attention_mask, position_ids[:, -1:], out.logits[:, -1])

    def _merge(self, running: _Running, joining: _Running) -> _Running:
        """New rows join the running batch: caches and masks left-padded to one length, then stacked.

        Padding is masked out, and positions stay per row, so every row decodes as it would alone.
        """
        length = max(running.attention_mask.shape[1], joining.attention_mask.shape[1])
        for mine, theirs in zip(running.cache.layers, joining.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, length, -2), _left_pad(theirs.keys, length, -2)])
            mine.values = torch.cat(
                [_left_pad(mine.values, length, -2), _left_pad(theirs.values, length, -2)]
            )
        return _Running(
            running.rows + joining.rows,
            running.cache,
            torch.cat(
                [_left_pad(running.attention_mask, length, 1), _left_pad(joining.attention_mask, length, 1)]
            ),
            torch.cat([running.last_positions, joining.last_positions]),
            torch.cat([running.logits, joining.logits]),
        )

    @torch.no_grad()
    def _step(self, running: _Running) -> _Running | None:
        """Choose every row's next token, retire finished rows, run the decoder once; None when empty."""
        rows = running.rows
        self.stats.decode_steps += 1
        self.stats.rows_decoded += len(rows)
        self.stats.batch_sizes[len(rows)] += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        next_tokens = []
        for index, row in enumerate(rows):
            token = self._pad
            if row.done:
                pass  # kept only when the cache cannot drop rows: it rides along, its output unused
            elif row.handle.cancelled.is_set():
                row.done = True  # nobody is reading: no more events for it
                self.stats.cancelled += 1
            else:
                try:
                    token = int(
                        pick_next_token(running.logits[index : index + 1], row.handle.config, row.generator)[
                            0
                        ]
                    )
                    self._advance(row, token)
                except Exception:  # one row's sampling or decoding must not end the batch's other rows
                    self._fail([row.handle], "choosing a token")
                    row.done, token = True, self._pad
            next_tokens.append(token)
        live = [index for index, row in enumerate(rows) if not row.done]
        if not live:
            return None
        cache, attention_mask, last_positions = running.cache, running.attention_mask, running.last_positions
        if len(live) < len(rows) and hasattr(cache, "batch_select_indices"):
            # Finished rows leave the batch (and its KV cache): the rest decode without them.
            keep = torch.tensor(live)
            cache.batch_select_indices(keep)
            rows = [rows[index] for index in live]
            next_tokens = [next_tokens[index] for index in live]
            attention_mask, last_positions = attention_mask[keep], last_positions[keep]
        # The padding that lined the remaining rows up with the ones that left goes too, or the batch's
        # width (and each step's cost) would grow for as long as it never empties.
        attention_mask = _drop_unused_columns(cache, attention_mask)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        last_positions = last_positions + 1
        with autocast(self._dtype):
            out = self.model.llm(
                input_ids=torch.tensor(next_tokens, dtype=torch.long).unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=last_positions,
                past_key_values=cache,
                use_cache=True,
            )
        return _Running(rows, out.past_key_values, attention_mask, last_positions, out.logits[:, -1])


def wait_for(handle: RequestHandle, timeout: float | None = None) -> tuple[str, Event]:
    """The whole answer of a thread-delivered handle and its final event (raises on an error event)."""
    text = []
    for event in handle.events(timeout):
        if event.kind == "delta":
            text.append(event.text)
        elif event.kind == "error":
            raise RuntimeError(event.text)
        else:
            return "".join(text), event
    raise RuntimeError("the request ended without a final event")  # pragma: no cover - events() ends on one
