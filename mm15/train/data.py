"""The training data stream: mixture -> sources -> samples -> tokens and images -> packed micro-batches.

``TrainStream`` draws a source name per sample from a ``MixtureSampler``, takes that source's next
sample, encodes it (``ChatEncoder``: chat template, assistant-only labels, length budget), loads its
images, and packs encoded samples into micro-batches (``collate``). What cannot be used is skipped and
counted, never silently lost: samples over the length budget (``too_long``) and samples with an image
that does not decode (``corrupt``); past ``max_corrupt_fraction`` of the samples seen the stream stops
with an error, since a data set that broken should not train quietly.

A source is named by a spec: ``synth:<generator>`` or ``synth:<category>`` (the category's generators
in turn), ``shards:<folder>`` (WebDataset shards from ``mm15 data``) or ``video:<annotations>`` (video-QA
JSON / JSONL read by ``mm15.data.video_qa.VideoQAReader``: 24 frames per video, videos relative to the
annotation file, read by record index so only the videos used are decoded; records that cannot be used
are counted by the reader). Its position is a counter, so
``state_dict()`` (the mixture's state plus every source's counter and the skip counts) restores the
stream exactly: a resumed run sees the same samples in the same order.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mm15.chat import ChatEncoder, EncodedSample, SampleTooLong
from mm15.data.mixture import MixtureSampler
from mm15.data.packing import Batch, collate
from mm15.data.sample import Sample
from mm15.image import ImageError, ImageProcessor, load_image


class CorruptDataError(RuntimeError):
    """Too many samples could not be used."""


class SampleSource:
    """An indexable stream of samples for one source spec (module docstring).

    With ``world_size`` ranks, rank ``r`` takes samples ``r, r + W, r + 2W, ...`` of the source, so the
    ranks together see each sample once per pass and never the same one. ``position`` counts this rank's
    samples, which is all a checkpoint needs to resume it.
    """

    def __init__(
        self, spec: str, split: str = "train", seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        kind, _, target = spec.partition(":")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.spec = spec
        self.position = 0
        self.rank, self.world_size = rank, world_size
        self._iter: Iterator[Sample] | None = None
        if kind == "synth":
            from mm15.data.synth import synth_names

            self.names = synth_names(target)
            self.split, self.seed = split, seed
        elif kind == "shards":
            from mm15.data.sources import ShardReader

            self.reader = ShardReader(target)
        elif kind == "video":
            from mm15.data.video_qa import VideoQAReader

            # Records whose video is missing or does not decode are skipped and counted by the reader.
            self.reader = VideoQAReader(target, strict=False)
        else:
            raise ValueError(
                f"source spec {spec!r}: must be 'synth:<generator or category>', 'shards:<dir>' "
                "or 'video:<annotations>'"
            )
        self.kind = kind

    def next(self) -> Sample:
        index = self.position * self.world_size + self.rank  # this rank's slice of the source
        self.position += 1
        if self.kind == "synth":
            from mm15.data.synth import generate

            name = self.names[index % len(self.names)]
            return generate(name, index // len(self.names), split=self.split, seed=self.seed)  # type: ignore[arg-type]
        if self.kind == "video":
            return self.reader.sample_at(index)  # random access: decodes only this rank's videos
        if self._iter is None:
            # Resuming: skip what was consumed (shards are streamed, so position is a sample count).
            self._iter = itertools.islice(itertools.cycle(self.reader), index, None, self.world_size)
        return next(self._iter)

    def seek(self, position: int) -> None:
        self.position = position
        self._iter = None


@dataclass
class MicroBatch:
    batch: Batch
    pixel_values: torch.Tensor | None
    samples: list[EncodedSample]
    token_source: torch.Tensor  # (rows, length) index into TrainStream.source_names, -1 on padding
    token_sample: torch.Tensor  # (rows, length) index into samples, -1 on padding
    images: int


class TrainStream:
    """Micro-batches of about ``tokens_per_micro`` tokens (module docstring)."""

    def __init__(
        self,
        sampler: MixtureSampler,
        sources: Mapping[str, str],
        encoder: ChatEncoder,
        images: ImageProcessor,
        samples_per_micro: int,
        pad_id: int,
        packed: bool = True,
        max_corrupt_fraction: float = 0.01,
        seed: int = 0,
        balanced: bool = False,
    ) -> None:
        self.sampler = sampler
        self.source_names = sorted(sources)
        # Each rank reads its own slice of every source; the sampler's rank gives the slice.
        self.sources = {
            name: SampleSource(spec, seed=seed, rank=sampler.rank, world_size=sampler.world_size)
            for name, spec in sources.items()
        }
        self.encoder = encoder
        self.images = images
        self.samples_per_micro = samples_per_micro
        self.pad_id = pad_id
        self.packed = packed
        self.max_corrupt_fraction = max_corrupt_fraction
        self.skipped: Counter[str] = Counter()
        self.seen = 0
        # Balanced sampling (OCR stage): names come a micro-batch at a time, each source equally often.
        self.balanced = balanced
        self._queue: list[str] = []

    def _next_name(self) -> str:
        if not self.balanced:
            return self.sampler.next()
        if not self._queue:
            self._queue = list(self.sampler.next_batch(self.samples_per_micro))
        return self._queue.pop(0)

    def _next_encoded(self) -> tuple[EncodedSample, list[Any], str]:
        in_a_row = 0
        while True:
            name = self._next_name()
            sample = self.sources[name].next()
            self.seen += 1
            in_a_row += 1
            if in_a_row > 1000:
                raise CorruptDataError(
                    f"1000 samples in a row could not be used ({dict(self.skipped)}): is seq_length "
                    f"({self.encoder.max_length}) too small for source {name!r}?"
                )
            try:
                pictures = [load_image(ref, name=f"{sample.id}[{i}]") for i, ref in enumerate(sample.images)]
                encoded = self.encoder.encode(sample, [(p.height, p.width) for p in pictures])
            except SampleTooLong:
                self.skipped["too_long"] += 1
                continue
            except ImageError:
                self.skipped["corrupt"] += 1
                if self.skipped["corrupt"] > self.max_corrupt_fraction * max(self.seen, 100):
                    raise CorruptDataError(
                        f"{self.skipped['corrupt']} of {self.seen} samples had images that do not decode, "
                        f"over max_corrupt_fraction={self.max_corrupt_fraction}"
                    ) from None
                continue
            return encoded, pictures, name

    def next_micro(self) -> MicroBatch:
        drawn = [self._next_encoded() for _ in range(self.samples_per_micro)]
        samples = [encoded for encoded, _, _ in drawn]
        batch = collate(samples, self.pad_id, self.encoder.max_length, packed=self.packed)
        order = batch.sample_order
        pictures = [p for i in order for p in drawn[i][1]]
        plans = [plan for i in order for plan in samples[i].plans]
        pixel_values = self.images(pictures, plans).pixel_values if pictures else None
        token_source = torch.full_like(batch.input_ids, -1)
        token_sample = torch.full_like(batch.input_ids, -1)
        source_index = {name: k for k, name in enumerate(self.source_names)}
        for r, row in enumerate(batch.rows):
            start = 0
            for i in row:
                n = len(samples[i].input_ids)
                token_source[r, start : start + n] = source_index[drawn[i][2]]
                token_sample[r, start : start + n] = i
                start += n
        return MicroBatch(batch, pixel_values, samples, token_source, token_sample, len(pictures))

    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": self.sampler.state_dict(),
            "positions": {name: source.position for name, source in self.sources.items()},
            "skipped": dict(self.skipped),
            "seen": self.seen,
            "queue": list(self._queue),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state["mixture"])
        for name, position in state["positions"].items():
            self.sources[name].seek(int(position))
        self.skipped = Counter(state.get("skipped", {}))
        self.seen = int(state.get("seen", 0))
        self._queue = list(state.get("queue", []))


class Prefetcher:
    """Prepares the next micro-batches on a background thread while the model trains on this one.

    Data preparation (rendering, decoding, resizing, tokenising) releases the GIL for most of its
    work, so it overlaps the training step instead of adding to it. Micro-batches come out in exactly
    the order the stream makes them, and ``state_dict()`` is the stream's state after the last
    micro-batch *handed out* (not the ones still queued), so a checkpoint resumes exactly. An error in
    the producer (e.g. ``CorruptDataError``) is raised in the consumer.

    ``background=False`` makes each micro-batch when it is asked for, on the caller's thread (the
    recipe's ``prefetch: inline``): on a machine whose cores torch's compute threads already fill, the
    background thread slows the step by more than the data work it hides.
    """

    def __init__(self, stream: TrainStream, depth: int = 2, background: bool = True) -> None:
        import queue
        import threading

        self.stream = stream
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state = stream.state_dict()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._produce, name="mm15-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        import queue

        while not self._stop.is_set():
            try:
                item: Any = (self.stream.next_micro(), self.stream.state_dict())
            except Exception as err:  # handed to the consumer, which raises it
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def next_micro(self) -> MicroBatch:
        if self._thread is None:
            micro = self.stream.next_micro()
            self._state = self.stream.state_dict()
            return micro
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        micro, self._state = item
        return micro

    def state_dict(self) -> dict[str, Any]:
        return self._state

    @property
    def source_names(self) -> list[str]:
        return self.stream.source_names

    @property
    def sampler(self) -> MixtureSampler:
        return self.stream.sampler

    @property
    def skipped(self) -> Counter[str]:
        return self.stream.skipped

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
