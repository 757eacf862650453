"""The training data stream: mixture -> sources -> samples -> tokens and images -> packed micro-batches.

``TrainStream`` draws a source name per sample from a ``MixtureSampler``, takes that source's next
sample, encodes it (``ChatEncoder``: chat template, assistant-only labels, length budget), loads its
images, and packs encoded samples into micro-batches (``collate``). What cannot be used is skipped and
counted, by reason and by source, never silently lost: samples over the length budget (``too_long``,
or an error with ``over_budget="error"``), samples with an image that does not decode (``corrupt``) and
samples whose text holds the image token itself (``reserved_token``);
past ``max_corrupt_fraction`` of the samples drawn the stream stops with an error, since a data set that
broken should not train quietly, and so does a source none of whose first ``DEAD_SOURCE_DRAWS`` drawn
samples could be used (a ``seq_length`` too small for its images, say: the other sources would fill the
batches and that part of the mixture would vanish). The realised mixture is counted over the samples
that went into micro-batches, not over the draws.

A source is named by a spec: ``synth:<generator>`` or ``synth:<category>`` (the category's generators
in turn), ``shards:<folder>`` (WebDataset shards from ``mm15 data``, read pass after pass, each pass in a
new seeded order through a shuffle buffer when ``shuffle_buffer`` > 0) or ``video:<annotations>`` (video-QA
JSON / JSONL read by ``mm15.data.video_qa.VideoQAReader``: 24 frames per video, videos relative to the
annotation file, read by record index so only the videos used are decoded; a record whose video is
missing or does not decode is skipped and counted like a corrupt image, under the reader's reason,
and lines that are not records are counted once when the stream opens the file, reported with the
other skips but not drawn, so neither check counts them). Its position is a
counter, so
``state_dict()`` (the mixture's state plus every source's counter and the skip counts) restores the
stream exactly: a resumed run sees the same samples in the same order.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import pickle
import queue
import random
import signal
import threading
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mm15.chat import ChatEncoder, EncodedSample, SampleTooLong
from mm15.data.mixture import MixtureSampler
from mm15.data.packing import Batch, collate
from mm15.data.sample import Sample
from mm15.data.sources import ShardReader, SkipCounter, SourceError
from mm15.image import ImageError, ImageProcessor, load_image
from mm15.model.mm15 import ReservedTokenError

MAX_SKIP_EXAMPLES = 10  # skipped samples a stream names (the rest are counted)
DEAD_SOURCE_DRAWS = 100  # draws of one source, none usable, after which the stream stops


class CorruptDataError(RuntimeError):
    """Too many samples could not be used, or one that the recipe says must not be skipped."""


class UnusableRecord(Exception):
    """A video source's record that cannot be used (its video is missing or does not decode):
    ``TrainStream`` skips and counts it. Shard sources are read strictly, so their ``SourceError``
    stops the run with the reader's message instead."""

    def __init__(self, error: SourceError) -> None:
        super().__init__(str(error))
        self.error = error


def buffer_shuffle(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """``samples`` in a random order: hold ``size`` of them and emit a random one as each new one arrives.

    Every sample comes out exactly once; the held ones, shuffled, come out at the end. ``size`` <= 1 keeps
    the order.
    """
    if size <= 1:
        yield from samples
        return
    held: list[Sample] = []
    for sample in samples:
        if len(held) < size:
            held.append(sample)
            continue
        k = rng.randrange(size)
        yield held[k]
        held[k] = sample
    rng.shuffle(held)
    yield from held


class SampleSource:
    """An indexable stream of samples for one source spec (module docstring).

    With ``world_size`` ranks, rank ``r`` takes samples ``r, r + W, r + 2W, ...`` of the source, so the
    ranks together see each sample once per pass and never the same one. ``position`` counts this rank's
    samples, which is all a checkpoint needs to resume it.
    """

    def __init__(
        self,
        spec: str,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
    ) -> None:
        kind, _, target = spec.partition(":")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.spec = spec
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.position = 0
        self.rank, self.world_size = rank, world_size
        # Samples in one pass over a shard source, known once a pass has been read: a resume then skips
        # whole passes without reading them (checkpoints carry it, TrainStream.state_dict).
        self.pass_length: int | None = None
        self._iter: Iterator[Sample] | None = None
        self._fingerprint: dict[str, Any] | None = None
        if kind == "synth":
            from mm15.data.synth import synth_names

            self.names = synth_names(target)
            self.split = split
        elif kind == "shards":
            # With shuffling, each pass reads the shards in a new order (ShardReader's epoch shuffle).
            self.reader = ShardReader(target, shuffle_seed=seed if shuffle_buffer > 0 else None)
        elif kind == "video":
            from mm15.data.video_qa import VideoQAReader

            # A record that cannot be used raises SourceError from next(): TrainStream skips and counts
            # it. Lines that are not records are left out of the listing (listing_skips).
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
            try:
                return self.reader.sample_at(index)  # random access: decodes only this rank's videos
            except SourceError as err:
                raise UnusableRecord(err) from None
        if self._iter is None:
            # Resuming: shards are streamed, so skipping what was consumed means reading it; with the
            # pass length known, only the current pass is read up to the position.
            first = index // self.pass_length if self.pass_length else 0
            offset = index - first * (self.pass_length or 0)
            self._iter = itertools.islice(self._passes(first), offset, None, self.world_size)
        return next(self._iter)

    def _passes(self, first_epoch: int) -> Iterator[Sample]:
        """The shards' samples pass after pass from ``first_epoch`` on, read afresh each time.

        Not ``itertools.cycle``, which keeps a copy of every sample of the first pass, so a shard source
        grew the training process by the whole data set's size (the memory test in tests/test_distributed.py
        fails on it). Pass ``e`` reads the shards in the reader's order for epoch ``e`` and shuffles through
        a buffer seeded by (seed, e): the same on every rank and in a resumed run, wherever the folder is
        (the path is not part of the seed).
        """
        for epoch in itertools.count(first_epoch):
            self.reader.set_epoch(epoch)
            count = 0
            rng = random.Random(f"{self.seed}/{epoch}")
            for sample in buffer_shuffle(self.reader, self.shuffle_buffer, rng):
                count += 1
                yield sample
            if not count:
                raise ValueError(f"source spec {self.spec!r}: no samples")
            self.pass_length = count

    def check_not_empty(self) -> None:
        """``ValueError`` for a shard folder or annotation file with no sample: what the stage would find
        at its first step. Reads the first sample of a shard folder, lists a video source's records."""
        if self.kind == "shards" and next(iter(self.reader), None) is None:
            raise ValueError(f"source spec {self.spec!r}: no samples")
        if self.kind == "video" and not self.reader.listed():
            raise ValueError(f"source spec {self.spec!r}: no video-QA records")

    def listing_skips(self) -> SkipCounter | None:
        """A video source's annotation lines that are not records (read now if not yet); None for the
        other kinds, whose bad records are found as they are read."""
        if self.kind != "video":
            return None
        self.reader.listed()
        return self.reader.skipped

    def seek(self, position: int) -> None:
        self.position = position
        self._iter = None

    def fingerprint(self) -> dict[str, Any] | None:
        """What a resume checks the source's files against: their count, bytes and a digest of their
        names and sizes (not their folder, so moved data still resumes exactly). The files are a shard
        source's shards and a video source's annotation files (its positions index their records); a
        synthetic source has none, being defined by its name."""
        if self.kind == "synth":
            return None
        if self._fingerprint is None:
            files = self.reader.shards if self.kind == "shards" else self.reader.paths
            listing = [(path.name, path.stat().st_size) for path in files]
            digest = hashlib.blake2b(json.dumps(listing).encode(), digest_size=8).hexdigest()
            total = sum(size for _, size in listing)
            self._fingerprint = {"files": len(listing), "bytes": total, "digest": digest}
        return self._fingerprint


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
        shuffle_buffer: int = 0,
        over_budget: Literal["drop", "error"] = "drop",
    ) -> None:
        if over_budget not in ("drop", "error"):
            raise ValueError(f"over_budget must be 'drop' or 'error', got {over_budget!r}")
        # A leaf of the mixture without a source failed with a KeyError at its first draw, perhaps hours in.
        missing = sorted(name for name, p in sampler.probs.items() if p > 0 and name not in sources)
        if missing:
            raise ValueError(
                f"the mixture draws from {missing}, which have no source (given: {sorted(sources)})"
            )
        self.sampler = sampler
        self.source_names = sorted(sources)
        # Each rank reads its own slice of every source; the sampler's rank gives the slice.
        self.sources = {
            name: SampleSource(
                spec,
                seed=seed,
                rank=sampler.rank,
                world_size=sampler.world_size,
                shuffle_buffer=shuffle_buffer,
            )
            for name, spec in sources.items()
        }
        self.encoder = encoder
        self.images = images
        self.samples_per_micro = samples_per_micro
        self.pad_id = pad_id
        self.packed = packed
        self.max_corrupt_fraction = max_corrupt_fraction
        self.over_budget = over_budget
        self.skipped: Counter[str] = Counter()  # per reason
        self.skipped_sources: Counter[str] = Counter()  # the same samples per source
        self.used: Counter[str] = Counter()  # samples per source that went into micro-batches
        self.skip_examples: list[str] = []  # the first MAX_SKIP_EXAMPLES skipped samples, named
        self.seen = 0
        # Balanced sampling (OCR stage): names come a micro-batch at a time, each source equally often.
        self.balanced = balanced
        self._queue: list[str] = []
        # Lines of an annotation file that are not records are counted once, here (a checkpoint carries
        # them on), and reported with the other skips; they were never drawn, so the checks on drawn
        # samples (the corrupt fraction, a dead source) leave them out, as the records `mm15 data pack`
        # skips never reach training either.
        self._listing_skips: Counter[str] = Counter()  # per reason
        self._listing_skips_sources: Counter[str] = Counter()
        # Every rank opens the whole file: rank 0 alone counts its lines, or a run's sum over ranks
        # would count each one once per rank.
        for name in self.source_names if sampler.rank == 0 else []:
            if (unlisted := self.sources[name].listing_skips()) is not None:
                for reason, count in unlisted.counts.items():
                    self.skipped[reason] += count
                    self.skipped_sources[name] += count
                    self._listing_skips[reason] += count
                    self._listing_skips_sources[name] += count
                for reason, messages in unlisted.examples.items():
                    for message in messages:
                        self._name_skip(f"{reason}: source {name!r}: {message}")

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
            self.seen += 1
            in_a_row += 1
            if in_a_row > 1000:
                raise CorruptDataError(
                    f"1000 samples in a row could not be used ({dict(self.skipped)}): is seq_length "
                    f"({self.encoder.max_length}) too small for source {name!r}?"
                )
            try:
                sample = self.sources[name].next()
            except UnusableRecord as unusable:  # a video record whose video is missing or does not decode
                err = unusable.error
                self._skip(err.reason, name, err.record_id or err.location, err)
                continue
            try:
                pictures = [load_image(ref, name=f"{sample.id}[{i}]") for i, ref in enumerate(sample.images)]
                encoded = self.encoder.encode(sample, [(p.height, p.width) for p in pictures])
            except SampleTooLong as err:
                if self.over_budget == "error":
                    raise CorruptDataError(
                        f"source {name!r}, {err}; the stage's data.over_budget is 'error' (raise "
                        "seq_length, or set over_budget: drop to skip and count such samples)"
                    ) from None
                self._skip("too_long", name, sample.id, err)
                continue
            except ImageError as err:
                self._skip("corrupt", name, sample.id, err)
                continue
            except ReservedTokenError as err:  # its text holds the image token itself
                self._skip("reserved_token", name, sample.id, err)
                continue
            self.used[name] += 1
            return encoded, pictures, name

    def _skip(self, reason: str, source: str, sample_id: str | None, error: Exception) -> None:
        """Count a sample that cannot be used, keep the first few so they can be found, and stop when
        too many are broken (every reason but ``too_long``) or a source yields nothing at all."""
        self.skipped[reason] += 1
        self.skipped_sources[source] += 1
        self._name_skip(f"{reason}: source {source!r}, sample {sample_id!r}: {error}")
        drawn_skips = self.skipped_sources[source] - self._listing_skips_sources[source]
        if self.used[source] == 0 and drawn_skips >= DEAD_SOURCE_DRAWS:
            raise CorruptDataError(
                f"none of the {drawn_skips} samples drawn from source {source!r} could be "
                f"used ({reason} the last time: {error}); is seq_length ({self.encoder.max_length}) too "
                "small for it, or its data broken?"
            )
        if reason != "too_long":
            self._check_corrupt_fraction()

    def _name_skip(self, message: str) -> None:
        if len(self.skip_examples) < MAX_SKIP_EXAMPLES:
            self.skip_examples.append(message)

    def _check_corrupt_fraction(self) -> None:
        """Stop past ``max_corrupt_fraction`` of broken samples (all skips but the too-long ones)."""
        broken = sum(
            count - self._listing_skips[reason]
            for reason, count in self.skipped.items()
            if reason != "too_long"
        )
        if broken > self.max_corrupt_fraction * max(self.seen, 100):
            raise CorruptDataError(
                f"{broken} of {self.seen} samples drawn could not be used ({dict(self.skipped)}), over "
                f"max_corrupt_fraction={self.max_corrupt_fraction}"
            )

    def realised_mixture(self) -> dict[str, float]:
        """Share of the samples that went into micro-batches per source (all 0 before the first)."""
        return self.mixture_of(self.used)

    def mixture_of(self, used: Mapping[str, int]) -> dict[str, float]:
        """The shares of ``used`` (samples per source; the sum over ranks, say) over the mixture's sources."""
        return _shares(used, self.sampler.probs)

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
            "pass_lengths": {
                name: source.pass_length for name, source in self.sources.items() if source.pass_length
            },
            "skipped": dict(self.skipped),
            "skipped_sources": dict(self.skipped_sources),
            "used": dict(self.used),
            "skip_examples": list(self.skip_examples),
            "seen": self.seen,
            "queue": list(self._queue),
            "fingerprints": {
                name: fingerprint
                for name, source in self.sources.items()
                if (fingerprint := source.fingerprint()) is not None
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> list[str]:
        """Continue from ``state``; returns warnings for the sources whose files changed since it.

        Such a source still continues from its position, but its pass length is not reused (a pass of
        the new data has another length) and the run no longer replays the samples of an uninterrupted
        one. Older checkpoints carry no fingerprints and are not checked.
        """
        self.sampler.load_state_dict(state["mixture"])
        changed = self._changed_sources(state.get("fingerprints", {}))
        for name, length in state.get("pass_lengths", {}).items():  # older checkpoints have none
            if name not in changed:
                self.sources[name].pass_length = int(length)
        for name, position in state["positions"].items():
            self.sources[name].seek(int(position))
        self.skipped = Counter(state.get("skipped", {}))
        self.skipped_sources = Counter(state.get("skipped_sources", {}))  # older checkpoints: none
        self.used = Counter(state.get("used", {}))
        self.skip_examples = list(state.get("skip_examples", []))
        self.seen = int(state.get("seen", 0))
        self._queue = list(state.get("queue", []))
        return list(changed.values())

    def _changed_sources(self, saved: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
        """{source name: warning} for the sources whose fingerprint differs from ``saved``."""
        changed = {}
        for name, then in saved.items():
            now = self.sources[name].fingerprint() if name in self.sources else None
            if now is None or dict(then) == now:
                continue
            changed[name] = (
                f"the files of source {name!r} ({self.sources[name].spec}) have changed since the "
                f"checkpoint ({_describe(then)} then, {_describe(now)} now): it continues from its "
                "position in the new data, so this run no longer repeats an uninterrupted one"
            )
        return changed


def _shares(used: Mapping[str, int], sources: Iterable[str]) -> dict[str, float]:
    total = sum(used.values())
    return {name: (used.get(name, 0) / total if total else 0.0) for name in sources}


def _describe(fingerprint: Mapping[str, Any]) -> str:
    # The digest tells apart shards renamed or replaced by others of the same total size.
    files, size, digest = fingerprint["files"], fingerprint["bytes"], fingerprint["digest"]
    return f"{files} file(s), {size:,} bytes, names and sizes {digest}"


PrefetchMode = Literal["inline", "thread", "process"]


class Prefetcher:
    """Hands out a stream's micro-batches, made inline, on a background thread or in a worker process.

    * ``inline``: each micro-batch is made when the step asks for it, on the caller's thread.
    * ``thread``: the next ``depth`` micro-batches are made on a background thread while the model
      trains. Rendering, decoding and resizing release the GIL for much of their work, the rest
      contends with the training loop for it.
    * ``process``: they are made in a forked worker process (one torch thread), as a DataLoader worker
      would, and travel as pickles through a pipe; no GIL is shared with the training loop.

    Whatever the mode, micro-batches come out in exactly the order the stream makes them, and
    ``state_dict()`` is the stream's state after the last micro-batch *handed out* (not the ones still
    queued), so a checkpoint resumes exactly. The stream's ``sampler`` and ``skipped`` counts, which
    the training log reads, follow the handed-out micro-batches too. An error in the producer (e.g.
    ``CorruptDataError``) is raised in the consumer; a worker process that dies is an error too.
    Which mode a recipe's ``auto`` picks, and why: ``mm15.train.run.prefetch_mode``.
    """

    def __init__(self, stream: TrainStream, depth: int = 2, mode: PrefetchMode = "thread") -> None:
        if mode not in ("inline", "thread", "process"):
            raise ValueError(f"prefetch mode must be inline, thread or process, got {mode!r}")
        self.stream = stream
        self.mode = mode
        self._state = stream.state_dict()
        # What the log reads follows the handed-out micro-batches, not the producer running ahead.
        self._sampler = copy.deepcopy(stream.sampler) if mode != "inline" else stream.sampler
        self._skipped = Counter(stream.skipped)
        self._thread: threading.Thread | None = None
        self._worker: Any = None
        if mode == "thread":
            self._queue: Any = queue.Queue(maxsize=depth)
            self._stop: Any = threading.Event()
            self._thread = threading.Thread(
                target=_produce,
                args=(stream, self._queue, self._stop, None),
                name="mm15-prefetch",
                daemon=True,
            )
            self._thread.start()
        elif mode == "process":
            import torch.multiprocessing as mp

            # fork: the worker starts from this very stream object, at its current position, with
            # nothing to pickle; torch re-creates its thread pool in the child.
            context = mp.get_context("fork")
            self._queue = context.Queue(maxsize=depth)
            self._stop = context.Event()
            self._worker = context.Process(
                target=_produce,
                args=(stream, self._queue, self._stop, os.getpid()),
                name="mm15-prefetch",
                daemon=True,
            )
            self._worker.start()

    def _get_from_worker(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._worker.is_alive():
                    raise RuntimeError(
                        f"the data worker process exited (code {self._worker.exitcode}) without a micro-batch"
                    ) from None

    def next_micro(self) -> MicroBatch:
        if self.mode == "inline":
            micro = self.stream.next_micro()
            self._state = self.stream.state_dict()
            return micro
        item = self._queue.get() if self.mode == "thread" else pickle.loads(self._get_from_worker())
        if isinstance(item, Exception):
            raise item
        micro, self._state = item
        self._sampler.load_state_dict(self._state["mixture"])
        self._skipped = Counter(self._state["skipped"])
        return micro

    def state_dict(self) -> dict[str, Any]:
        return self._state

    @property
    def source_names(self) -> list[str]:
        return self.stream.source_names

    @property
    def sampler(self) -> MixtureSampler:
        return self._sampler

    @property
    def skipped(self) -> Counter[str]:
        return self.stream.skipped if self.mode == "inline" else self._skipped

    @property
    def skip_examples(self) -> list[str]:
        """The first skipped samples, as of the last micro-batch handed out (as ``skipped``)."""
        return list(self._state.get("skip_examples", []))

    @property
    def skipped_sources(self) -> Counter[str]:
        """Skipped samples per source, as of the last micro-batch handed out (as ``skipped``)."""
        return Counter(self._state.get("skipped_sources", {}))

    @property
    def used(self) -> Counter[str]:
        """Samples per source that went into micro-batches, as of the last one handed out."""
        return Counter(self._state.get("used", {}))

    def realised_mixture(self) -> dict[str, float]:
        """``TrainStream.realised_mixture`` as of the last micro-batch handed out."""
        return self.mixture_of(self.used)

    def mixture_of(self, used: Mapping[str, int]) -> dict[str, float]:
        """``TrainStream.mixture_of``."""
        return _shares(used, self._sampler.probs)

    def close(self) -> None:
        if self.mode == "inline":
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._worker is not None:
            self._worker.join(timeout=10)
            if self._worker.is_alive():
                self._worker.kill()  # not terminate(): the worker ignores SIGTERM (see _produce)
                self._worker.join(timeout=10)
            self._queue.close()
            self._queue.cancel_join_thread()  # micro-batches left in the pipe are not waited for


def _to_consumer(item: Any, failed: bool) -> tuple[bytes, bool]:
    """``item`` (a micro-batch and state, or the error that ``failed`` to make one) pickled for the
    training process, and whether it could be.

    An error carries the worker's traceback as a note, which the training process prints with it. What
    cannot make the round trip (an exception whose ``__init__`` takes other arguments than it passes
    up, an unpicklable object in a micro-batch) becomes a ``RuntimeError`` naming it, never an
    unrelated error raised while unpickling on the other side.
    """
    if failed:
        where = "".join(traceback.format_exception(item)).rstrip()
        item.add_note(f"raised in the data worker process:\n{where}")
    try:
        data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        if failed:
            pickle.loads(data)  # the consumer's half of the round trip
        return data, True
    except Exception as err:
        what = f"{type(item).__name__}: {item}" if failed else "a micro-batch"
        problem = RuntimeError(
            f"data worker: {what} could not be sent to the training process ({type(err).__name__}: {err})"
        )
        if failed:
            for note in getattr(item, "__notes__", ()):
                problem.add_note(note)
        return pickle.dumps(problem, protocol=pickle.HIGHEST_PROTOCOL), False


def _produce(stream: TrainStream, out: Any, stop: Any, parent: int | None) -> None:
    """The producer of ``Prefetcher``'s thread and process modes: micro-batches into ``out`` until ``stop``.

    An error is handed to the consumer, which raises it, and ends production. In the worker process
    (``parent``: the training process's pid; None on a thread) each item crosses as one plain pickle,
    tensors by value (the pixels are uint8): torch's shared-memory tensors would pass a file descriptor
    per tensor, each fetched from a thread of the worker that must first win the worker's GIL from the
    producer, and that made the training loop wait for 7% of its time even with a core to spare.

    A worker whose training process died without closing it (SIGKILL, the OOM killer) would wait
    forever for room in a queue nobody reads, holding its memory: it checks that its parent is still
    the process that forked it (an orphan is re-parented) and exits when not.
    """
    in_worker = parent is not None

    def running() -> bool:
        return not stop.is_set() and not (in_worker and os.getppid() != parent)

    if in_worker:
        torch.set_num_threads(1)  # the training process's threads have the other cores
        # Ctrl+C in a terminal signals the whole process group. The training process finishes its step
        # and closes this worker (mm15.train.run.StopSignals), which must live until then.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
    while running():
        try:
            item: Any = (stream.next_micro(), stream.state_dict())
        except Exception as err:
            item = err
        failed = isinstance(item, Exception)
        if in_worker:
            item, sent_ok = _to_consumer(item, failed)
            failed = failed or not sent_ok
        while running():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if failed and running():
            return  # the queue's feeder thread delivers the error before the worker exits
    if in_worker:
        # Stopped or orphaned: what is still buffered for the pipe is not wanted. Without this the
        # worker's exit would wait for the training process to read it, which it never does, until
        # close() gave up after its timeout and terminated the worker (10 s at the end of every stage).
        out.cancel_join_thread()
