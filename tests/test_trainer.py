"""The training loop: loss falls, a NaN stops the stage cleanly, corrupt data is counted, resume is exact."""

from __future__ import annotations

import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mm15.chat import ChatEncoder, SampleTooLong
from mm15.data.mixture import MixtureNode, MixtureSampler
from mm15.data.sample import Sample
from mm15.data.sources import SourceError
from mm15.image import ImageDecodeError, ImageProcessor, ImageTooLargeError
from mm15.model.mm15 import MM15Model
from mm15.model.presets import preset
from mm15.train.checkpoint import load_checkpoint, save_checkpoint
from mm15.train.data import CorruptDataError, Prefetcher, PrefetchMode, SampleSource, TrainStream
from mm15.train.trainer import NonFiniteLoss, build_optimizer, train_step, warmup_cosine
from mm15.video import VideoError

SOURCES = {"general": "synth:general-color", "ground": "synth:refer-ground"}


def setup(seed: int = 0, max_corrupt_fraction: float = 0.01):
    torch.manual_seed(seed)
    model = MM15Model.build(preset("tiny")).train()
    sampler = MixtureSampler(MixtureNode.from_dict({"general": 1, "ground": 1}), seed=seed)
    stream = TrainStream(
        sampler,
        SOURCES,
        ChatEncoder(model.tokenizer, model.cfg.image, max_length=1024),
        ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std),
        samples_per_micro=2,
        pad_id=model.tokenizer.pad_token_id,
        max_corrupt_fraction=max_corrupt_fraction,
    )
    optimizer = build_optimizer(
        model, ["encoder", "connector", "llm"], dict.fromkeys(("encoder", "connector", "llm"), 2e-3)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 40, 0.1))
    return model, stream, optimizer, scheduler


def steps(model, stream, optimizer, scheduler, start: int, n: int, **kwargs) -> list[float]:
    return [
        train_step(
            model,
            stream,
            optimizer,
            scheduler,
            accum=1,
            step=s,
            dtype=torch.float32,
            max_grad_norm=1.0,
            peak_flops=1e11,
            **kwargs,
        ).loss
        for s in range(start, start + n)
    ]


def test_moe_aux_losses_are_reported_per_step_without_autograd_warnings() -> None:
    """The step's aux figures are the micro-batches' mean of the model's (coefficient-weighted) aux
    losses; reading them must not go through tensors that require grad (torch warns, and will raise)."""
    import dataclasses
    import warnings

    from mm15.model.moe import MoEConfig

    model, stream, optimizer, scheduler = setup()
    torch.manual_seed(0)
    model = MM15Model.build(dataclasses.replace(preset("tiny"), moe=MoEConfig(num_experts=4))).train()
    optimizer = build_optimizer(
        model,
        ["encoder", "connector", "llm", "routers"],
        dict.fromkeys(("encoder", "connector", "llm", "routers"), 2e-3),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(2, 40, 0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train_step(model, stream, optimizer, scheduler, 2, 0, torch.float32, 1.0, 1e11)
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    aux = metrics.aux
    assert set(aux) == {"load_balance", "router_z", "total"}
    assert aux["load_balance"] > 0 and aux["router_z"] > 0
    assert aux["total"] == pytest.approx(aux["load_balance"] + aux["router_z"], rel=1e-6)


def test_the_logged_aux_losses_are_the_mean_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """They were rank 0's alone. Two ranks whose figures sum to three times this one's (the other rank's
    twice as large): the step reports the mean over ranks, 1.5 times this rank's aux losses."""
    import dataclasses

    import mm15.train.trainer as trainer_module
    from mm15.model.moe import MoEConfig

    _, stream, _, _ = setup()
    torch.manual_seed(0)
    model = MM15Model.build(dataclasses.replace(preset("tiny"), moe=MoEConfig(num_experts=4))).train()
    modules = ["encoder", "connector", "llm", "routers"]
    optimizer = build_optimizer(model, modules, dict.fromkeys(modules, 0.0))  # no update: same aux again
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = stream.state_dict()
    alone = train_step(model, stream, optimizer, scheduler, 1, 0, torch.float32, 1.0, 1e11).aux
    stream.load_state_dict(state)
    monkeypatch.setattr(trainer_module.D, "world_size", lambda: 2)
    monkeypatch.setattr(trainer_module.D, "sum_across_ranks", lambda t: t * 3)
    monkeypatch.setattr(trainer_module.D, "global_token_count", lambda n: n * 3)
    both = train_step(model, stream, optimizer, scheduler, 1, 1, torch.float32, 1.0, 1e11).aux
    assert set(both) == set(alone) and alone["total"] > 0
    for key in alone:
        assert both[key] == pytest.approx(1.5 * alone[key], rel=1e-6), key


def test_loss_falls_and_metrics_are_reported() -> None:
    model, stream, optimizer, scheduler = setup()
    losses = steps(model, stream, optimizer, scheduler, 0, 12)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    metrics = train_step(model, stream, optimizer, scheduler, 1, 12, torch.float32, 1.0, 1e11)
    assert (
        set(metrics.source_loss) <= set(SOURCES) and metrics.tokens_per_s > 0 and 0 <= metrics.data_wait < 1
    )
    assert abs(sum(metrics.mixture.values()) - 1) < 1e-9


def test_nan_loss_stops_before_the_update() -> None:
    model, stream, optimizer, scheduler = setup()
    steps(model, stream, optimizer, scheduler, 0, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="step 2: the loss is nan"):
        steps(model, stream, optimizer, scheduler, 2, 1, loss_hook=lambda loss: loss * float("nan"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward whose backward overflows, as a mixed-precision backward can."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("inf")


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_finite_loss_with_an_infinite_gradient_is_not_applied(max_grad_norm: float) -> None:
    """Only the loss was checked: clipping then turned the infinite gradient into NaN weights."""
    model, stream, optimizer, scheduler = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    common = {"accum": 1, "dtype": torch.float32, "max_grad_norm": max_grad_norm, "peak_flops": 1e11}
    with pytest.raises(NonFiniteLoss, match=r"step 0: the gradient norm is (inf|nan)"):
        train_step(model, stream, optimizer, scheduler, step=0, loss_hook=_InfiniteGradient.apply, **common)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = train_step(
        model,
        stream,
        optimizer,
        scheduler,
        step=1,
        loss_hook=_InfiniteGradient.apply,
        nan_policy="skip",
        **common,
    )
    assert metrics.skipped and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not train_step(model, stream, optimizer, scheduler, step=2, **common).skipped  # then trains on


def test_a_step_skipped_for_its_gradient_records_the_loss_it_measured() -> None:
    """The loss was finite, only the gradient norm was not: the step's loss was recorded as NaN, next to
    finite per-source losses (metrics.jsonl and TensorBoard then disagreed with themselves)."""
    model, stream, optimizer, scheduler = setup()
    common = {"accum": 1, "dtype": torch.float32, "max_grad_norm": 1.0, "peak_flops": 1e11}
    metrics = train_step(
        model,
        stream,
        optimizer,
        scheduler,
        step=0,
        loss_hook=_InfiniteGradient.apply,
        nan_policy="skip",
        **common,
    )
    assert metrics.skipped and math.isfinite(metrics.loss)
    # The token mean over the sources lies between them (up to float32 sums); and it is the loss the
    # same step reports when it is not skipped.
    low, high = min(metrics.source_loss.values()), max(metrics.source_loss.values())
    assert low * (1 - 1e-6) <= metrics.loss <= high * (1 + 1e-6)
    model, stream, optimizer, scheduler = setup()
    assert metrics.loss == train_step(model, stream, optimizer, scheduler, step=0, **common).loss


def test_corrupt_images_are_skipped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    real_next = SampleSource.next

    def flaky(self: SampleSource) -> Sample:
        sample = real_next(self)
        if self.position % 3 == 0 and sample.images:
            sample.images = [b"\x89PNG\r\n\x1a\n truncated"] * len(sample.images)
        return sample

    monkeypatch.setattr(SampleSource, "next", flaky)
    model, stream, optimizer, scheduler = setup(max_corrupt_fraction=0.5)
    steps(model, stream, optimizer, scheduler, 0, 3)
    assert stream.skipped["corrupt"] >= 1 and stream.seen == 6 + stream.skipped["corrupt"]
    strict = setup(max_corrupt_fraction=0.001)
    with pytest.raises(CorruptDataError, match=r"max_corrupt_fraction=0\.001"):
        steps(*strict, 0, 3)


def short_stream(over_budget: str = "drop") -> TrainStream:
    """Text-only samples and grounding samples, in 72 tokens: no image sample fits (one needs >= 80)."""
    sources = {"text": "synth:text-only", "ground": "synth:refer-ground"}
    return tiny_stream(sources, max_length=72, over_budget=over_budget)


def tiny_stream(
    sources: dict[str, str], max_length: int, rank: int = 0, world_size: int = 1, **options: Any
) -> TrainStream:
    """A stream of the tiny model's tokenizer and images over ``sources``, weighted equally."""
    model = MM15Model.build(preset("tiny"))
    return TrainStream(
        MixtureSampler(
            MixtureNode.from_dict(dict.fromkeys(sources, 1)), seed=0, rank=rank, world_size=world_size
        ),
        sources,
        ChatEncoder(model.tokenizer, model.cfg.image, max_length=max_length),
        ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std),
        samples_per_micro=2,
        pad_id=model.tokenizer.pad_token_id,
        **options,
    )


def test_a_mixture_source_without_a_spec_is_refused_when_the_stream_is_made() -> None:
    """It was a bare KeyError at the source's first draw, which a small weight can put hours in."""
    model = MM15Model.build(preset("tiny"))
    sampler = MixtureSampler(MixtureNode.from_dict({"general": 1, "rare": 0.001}), seed=0)
    with pytest.raises(ValueError, match=r"the mixture draws from \['rare'\], which have no source"):
        TrainStream(
            sampler,
            {"general": SOURCES["general"]},
            ChatEncoder(model.tokenizer, model.cfg.image, max_length=1024),
            ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std),
            samples_per_micro=2,
            pad_id=model.tokenizer.pad_token_id,
        )


def test_skips_are_counted_per_source_and_the_mixture_over_what_trained() -> None:
    # The draws are half grounding, but none of those fits: the realised mixture must say so (it
    # counted draws and reported 50%), and a source that never yields a sample stops the stream.
    stream = short_stream()
    for _ in range(5):
        stream.next_micro()
    assert stream.realised_mixture() == {"ground": 0.0, "text": 1.0}
    assert stream.used == {"text": 10}
    skipped = stream.skipped_sources  # some text-only samples are too long as well
    assert skipped["ground"] > 0 and sum(skipped.values()) == stream.skipped["too_long"]
    assert stream.sampler.realised()["ground"] > 0.2  # the draws, by contrast
    state = stream.state_dict()
    again = short_stream()
    again.load_state_dict(state)
    assert again.used == stream.used and again.skipped_sources == stream.skipped_sources
    with pytest.raises(CorruptDataError, match=r"none of the 100 samples drawn from source 'ground'"):
        for _ in range(200):
            stream.next_micro()


def test_over_budget_error_stops_at_the_first_sample_too_long() -> None:
    message = r"source '(ground|text)', sample .* over the budget of 72.*over_budget"
    with pytest.raises(CorruptDataError, match=message):
        for _ in range(5):
            short_stream("error").next_micro()
    with pytest.raises(ValueError, match="over_budget must be"):
        short_stream("truncate")


def test_a_sample_holding_the_image_token_is_skipped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    from mm15.data.sample import Turn
    from mm15.model.mm15 import IMAGE_TOKEN

    real_next = SampleSource.next

    def with_token(self: SampleSource) -> Sample:
        sample = real_next(self)
        if self.position % 2 == 0:
            last = sample.turns[-1]
            sample.turns[-1] = Turn(last.role, f"{last.content} {IMAGE_TOKEN}")
        return sample

    monkeypatch.setattr(SampleSource, "next", with_token)
    _, stream, _, _ = setup(max_corrupt_fraction=0.9)
    micro = stream.next_micro()
    assert stream.skipped["reserved_token"] >= 1 and len(micro.samples) == 2
    assert any(e.startswith("reserved_token: source") for e in stream.skip_examples)


def test_resume_from_a_checkpoint_continues_the_same_losses(tmp_path: Path) -> None:
    model, stream, optimizer, scheduler = setup()
    steps(model, stream, optimizer, scheduler, 0, 3)
    save_checkpoint(tmp_path, 3, model, optimizer, scheduler, {"data": stream.state_dict()}, keep_last=2)
    expected = steps(model, stream, optimizer, scheduler, 3, 3)

    model2, stream2, optimizer2, scheduler2 = setup()
    with torch.no_grad():  # scramble the fresh model: everything must come from the checkpoint
        for p in model2.parameters():
            p.add_(torch.randn_like(p))
    step, extra = load_checkpoint(tmp_path / "step-00000003", model2, optimizer2, scheduler2)
    stream2.load_state_dict(extra["data"])
    assert step == 3
    assert steps(model2, stream2, optimizer2, scheduler2, 3, 3) == expected


def shard_stream(model: MM15Model, folder: Path) -> TrainStream:
    """A stream of one shard source, 3 samples per micro-batch, tolerant of half its images corrupt."""
    return TrainStream(
        MixtureSampler(MixtureNode.from_dict({"shards": 1}), seed=0),
        {"shards": f"shards:{folder}"},
        ChatEncoder(model.tokenizer, model.cfg.image, max_length=1024),
        ImageProcessor(model.cfg.image, model.vision.image_mean, model.vision.image_std),
        samples_per_micro=3,
        pad_id=model.tokenizer.pad_token_id,
        max_corrupt_fraction=0.5,
    )


def test_a_shard_with_corrupt_images_is_skipped_and_counted(tmp_path: Path) -> None:
    from mm15.data.sources import write_shards
    from mm15.data.synth import generate

    samples = [generate("general-color", i) for i in range(8)]
    for i in (2, 5):
        samples[i].images = [b"\x89PNG\r\n\x1a\n this is not the rest of a PNG"]  # corrupt image bytes
    write_shards(samples, tmp_path, samples_per_shard=4)
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).train()
    stream = shard_stream(model, tmp_path)
    micros = [stream.next_micro() for _ in range(2)]
    assert stream.skipped["corrupt"] == 2 and stream.seen == 8  # 6 used, the 2 corrupt ones counted
    # ... and named, so they can be found in the data.
    assert [e.split(":")[0:2] for e in stream.skip_examples] == [
        ["corrupt", f" source 'shards', sample '{samples[i].id}'"] for i in (2, 5)
    ]
    assert [s.sample_id for m in micros for s in m.samples] == [samples[i].id for i in (0, 1, 3, 4, 6, 7)]
    # A third micro-batch starts the second pass: the pass length is known and carried by the state,
    # and a stream restored from that state continues with the same samples.
    stream.next_micro()
    state = stream.state_dict()
    assert state["pass_lengths"] == {"shards": 8} and state["positions"] == {"shards": 12}  # 2 corrupt
    fourth = [s.sample_id for s in stream.next_micro().samples]
    restored = shard_stream(model, tmp_path)
    assert restored.load_state_dict(state) == []  # the same shards: nothing to warn about
    assert restored.sources["shards"].pass_length == 8
    assert (
        restored.skip_examples == state["skip_examples"] and len(state["skip_examples"]) == 3
    )  # pass 2: again
    assert [s.sample_id for s in restored.next_micro().samples] == fourth
    # The folder moved: the same shards, so the resume is exact and says nothing.
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path, moved)
    elsewhere = shard_stream(model, moved)
    assert elsewhere.load_state_dict(state) == []
    assert [s.sample_id for s in elsewhere.next_micro().samples] == fourth
    # A shard added since the checkpoint: the stream goes on from its position with a warning, and the
    # old pass length (8) is not applied to data whose pass is now 12 samples long.
    write_shards([generate("general-color", i) for i in range(8, 12)], moved, prefix="more")
    grown = shard_stream(model, moved)
    (warning,) = grown.load_state_dict(state)
    assert "the files of source 'shards'" in warning and "have changed since the checkpoint" in warning
    assert "2 file(s)" in warning and "3 file(s)" in warning and "no longer repeats" in warning, warning
    assert grown.sources["shards"].pass_length is None and grown.sources["shards"].position == 12
    assert len(grown.next_micro().samples) == 3


def test_a_video_source_is_fingerprinted_by_its_annotation_files(tmp_path: Path) -> None:
    """Video positions index the annotation records, so a resume checks those files (moved: the same)."""
    notes = tmp_path / "a" / "clips.jsonl"
    notes.parent.mkdir()
    notes.write_text('{"id": "v0", "video": "v0.mp4", "conversations": []}\n')
    before = SampleSource(f"video:{notes}").fingerprint()
    assert before is not None and before["files"] == 1 and before["bytes"] == notes.stat().st_size
    moved = tmp_path / "b" / "clips.jsonl"
    moved.parent.mkdir()
    shutil.copy(notes, moved)
    assert SampleSource(f"video:{moved}").fingerprint() == before
    with notes.open("a") as f:
        f.write('{"id": "v1", "video": "v1.mp4", "conversations": []}\n')
    assert SampleSource(f"video:{notes}").fingerprint() != before
    assert SampleSource("synth:general").fingerprint() is None  # defined by its name


def video_stream(
    tmp_path: Path, max_corrupt_fraction: float, rank: int = 0, world_size: int = 1
) -> TrainStream:
    """One usable clip, nine records whose video is missing and a line that is not a record."""
    import json

    import numpy as np
    from PIL import Image

    from mm15.video import write_video

    frames = [Image.fromarray(np.full((32, 32, 3), 40 * k, dtype=np.uint8)) for k in range(4)]
    write_video(tmp_path / "ok.mp4", frames, fps=4)
    records = [{"id": "good", "video": "ok.mp4", "question": "What moves?", "answer": "a ball"}]
    records += [{"id": f"gone{k}", "video": f"gone{k}.mp4", "question": "q", "answer": "a"} for k in range(9)]
    notes = tmp_path / "clips.jsonl"
    notes.write_text("\n".join(map(json.dumps, records)) + "\nnot json\n")
    sources = {"video": f"video:{notes}"}
    return tiny_stream(
        sources, max_length=1024, rank=rank, world_size=world_size, max_corrupt_fraction=max_corrupt_fraction
    )


def test_lines_that_are_not_records_are_counted_once_across_ranks(tmp_path: Path) -> None:
    """Every rank opens the whole annotation file; each counted its bad line, and a 2-rank run's
    summary (the sum over ranks) showed it twice. Rank 0 alone counts it now."""
    counts = [video_stream(tmp_path, 0.95, rank=r, world_size=2).skipped for r in (0, 1)]
    assert counts == [{"bad_json": 1}, {}]


def test_unusable_video_records_are_skipped_counted_and_limited(tmp_path: Path) -> None:
    # The reader counted them on its own and stood the good clip in for each: the stream reported no
    # skips, and 90% of the data set could be missing without max_corrupt_fraction noticing.
    stream = video_stream(tmp_path, max_corrupt_fraction=0.95)
    assert stream.skipped == {"bad_json": 1}  # the line that is not a record, counted on opening
    for _ in range(5):
        micro = stream.next_micro()
        assert [s.sample_id for s in micro.samples] == ["good", "good"]
    # Ten passes over the ten records for ten good samples: nine missing videos in each of the first nine
    # passes before its good one (record 0), then the tenth pass starts with it.
    assert stream.skipped["missing_video"] == 9 * 9 and stream.seen == 10 + 81
    assert stream.skipped_sources == {"video": 1 + 81}
    assert any("missing_video: source 'video', sample 'gone0'" in e for e in stream.skip_examples)
    strict = video_stream(tmp_path, max_corrupt_fraction=0.5)
    with pytest.raises(CorruptDataError, match=r"could not be used.*max_corrupt_fraction=0\.5"):
        for _ in range(5):
            strict.next_micro()


@pytest.mark.parametrize("first", ["good", "gone"])
def test_lines_that_are_not_records_are_not_broken_draws(tmp_path: Path, first: str) -> None:
    """150 lines that are not records, counted on opening, were never drawn: one missing video after
    them must not stop the stream, neither as a corrupt fraction (it read "151 of 2 samples") nor, when
    drawn first, as a dead source (none of "151 samples drawn" could be used)."""
    import json

    import numpy as np
    from PIL import Image

    from mm15.video import write_video

    frames = [Image.fromarray(np.full((32, 32, 3), 40 * k, dtype=np.uint8)) for k in range(4)]
    write_video(tmp_path / "ok.mp4", frames, fps=4)
    records = [
        {"id": "good", "video": "ok.mp4", "question": "What moves?", "answer": "a ball"},
        {"id": "gone", "video": "gone.mp4", "question": "q", "answer": "a"},
    ]
    records.sort(key=lambda record: record["id"] != first)
    notes = tmp_path / "clips.jsonl"
    notes.write_text("\n".join(map(json.dumps, records)) + "\n{cut off" * 150 + "\n")
    # Two broken draws are allowed: 0.02 x max(seen, 100).
    stream = tiny_stream({"video": f"video:{notes}"}, max_length=1024, max_corrupt_fraction=0.02)
    assert stream.skipped == {"bad_json": 150}
    assert [s.sample_id for s in stream.next_micro().samples] == ["good", "good"]
    missing = 1 if first == "good" else 2  # good, gone, good; or gone, good, gone, good
    assert stream.skipped == {"bad_json": 150, "missing_video": missing} and stream.seen == 2 + missing
    assert stream.skipped_sources == {"video": 150 + missing}  # reported with the others


def _with_options(**options: bool) -> list[float]:
    from mm15.train.run import speed_options

    model, stream, optimizer, scheduler = setup()
    speed_options(model, **options)
    return steps(model, stream, optimizer, scheduler, 0, 3)


def test_gradient_checkpointing_gives_the_same_losses() -> None:
    """Recomputing activations in backward changes memory, not the numbers."""
    assert _with_options(grad_checkpointing=True) == steps(*setup(), 0, 3)


def _fake_compile(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
    """``Module.compile`` without inductor: the module's call goes through ``_compiled_call_impl``."""
    module._compiled_call_impl = module._call_impl


def _speed_state(model: MM15Model) -> tuple[bool, bool, int, int]:
    """(LLM checkpointed, encoder checkpointed, input-embedding hooks, compiled blocks)."""
    from mm15.train.distributed import vision_blocks

    blocks = [*model.llm.get_decoder().layers, *vision_blocks(model)]
    return (
        model.llm.is_activation_checkpointing,
        model.vision.model.is_activation_checkpointing,
        len(getattr(model.llm, "_require_grads_hooks", [])),
        sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks),
    )


def test_speed_options_apply_a_stages_settings_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later stage of a run reuses the model: its grad_checkpointing and compile false must turn the
    earlier stage's off (they were only ever switched on), and switching on twice adds nothing twice."""
    from mm15.train.distributed import vision_blocks
    from mm15.train.run import speed_options

    monkeypatch.setattr(torch.nn.Module, "compile", _fake_compile)
    model, stream, optimizer, scheduler = setup()
    blocks = len(model.llm.get_decoder().layers) + len(vision_blocks(model))
    speed_options(model, grad_checkpointing=True, compile=True)
    assert _speed_state(model) == (True, True, 1, blocks)
    speed_options(model, grad_checkpointing=True, compile=True)
    assert _speed_state(model) == (True, True, 1, blocks)
    speed_options(model, grad_checkpointing=False, compile=False)
    assert _speed_state(model) == (False, False, 0, 0)
    # And it trains as a model that never had them.
    assert steps(model, stream, optimizer, scheduler, 0, 2) == steps(*setup(), 0, 2)


@pytest.mark.slow  # inductor compiles every block type once: about 2 minutes on 2 cores
def test_compile_gives_the_same_losses() -> None:
    torch.testing.assert_close(_with_options(compile=True), steps(*setup(), 0, 3), rtol=1e-5, atol=0)


def test_the_fused_adamw_updates_as_the_foreach_reference() -> None:
    """build_optimizer's fused AdamW keeps the per-module groups and moves the weights as torch's default
    (foreach) AdamW does, to float32 rounding, over three steps with weight decay."""
    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny"))
    reference_model = MM15Model.build(preset("tiny"))
    reference_model.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    lr = {"encoder": 1e-3, "connector": 3e-3, "llm": 2e-4}
    ours = build_optimizer(model, lr, lr, weight_decay=0.1)
    assert ours.defaults["fused"] is True
    assert {g["name"]: g["lr"] for g in ours.param_groups} == lr
    groups = [
        {"params": g["params"], "lr": g["lr"]} for g in build_optimizer(reference_model, lr, lr).param_groups
    ]
    reference = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=generator)
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    for p, q, p0 in zip(model.parameters(), reference_model.parameters(), initial, strict=True):
        assert not torch.equal(p, p0)  # every parameter is trainable here and moved
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_token_weights_count_each_sample_equally_or_by_sqrt() -> None:
    from mm15.train.trainer import token_weights

    _, stream, _, _ = setup()
    micro = stream.next_micro()
    supervised = micro.batch.labels[:, 1:] != -100
    owners = micro.token_sample[:, 1:][supervised]
    counts = torch.bincount(owners).float()
    assert len(counts) == 2 and counts.min() > 0  # two samples, both supervised
    assert torch.equal(token_weights(micro, "token"), torch.ones(len(owners)))
    sample = token_weights(micro, "sample")
    for index in range(2):  # each sample's tokens sum to 1
        torch.testing.assert_close(sample[owners == index].sum(), torch.tensor(1.0))
    torch.testing.assert_close(token_weights(micro, "sqrt")[owners == 0].sum(), counts[0].sqrt())
    with pytest.raises(ValueError, match="unknown loss weighting 'mean'"):
        token_weights(micro, "mean")


@pytest.mark.parametrize("weighting", ["sample", "sqrt"])
def test_a_steps_gradient_is_the_weighted_mean_of_its_token_losses(weighting: str) -> None:
    """train_step's gradient is that of sum(w * token loss) / sum(w) with ``token_weights``' w: a step
    that ignored ``loss_weighting`` still trained and reported the same first loss."""
    from mm15.train.trainer import token_weights

    def gradients_of_one_step(loss_weighting: str) -> list[torch.Tensor]:
        model, stream, optimizer, scheduler = setup()
        seen: list[torch.Tensor] = []
        optimizer.register_step_pre_hook(
            lambda *_: seen.extend(p.grad.clone() for p in model.parameters() if p.grad is not None)
        )
        train_step(model, stream, optimizer, scheduler, accum=1, step=0, dtype=torch.float32,
                   max_grad_norm=1e9, peak_flops=1e11, loss_weighting=loss_weighting)  # fmt: skip
        return seen

    model, stream, _, _ = setup()
    micro = stream.next_micro()
    weights = token_weights(micro, weighting)
    assert not torch.allclose(weights / weights.sum(), torch.full_like(weights, 1 / len(weights)))
    out = model(pixel_values=micro.pixel_values, **micro.batch.model_inputs())
    ((out.token_losses * weights).sum() / weights.sum()).backward()
    expected = [p.grad for p in model.parameters() if p.grad is not None]
    weighted = gradients_of_one_step(weighting)
    assert len(weighted) == len(expected)
    for got, want in zip(weighted, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    token_mean = gradients_of_one_step("token")
    pairs = zip(token_mean, expected, strict=True)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in pairs)  # the weighting matters


def test_sample_weighting_trains_and_reports_the_token_mean() -> None:
    model, stream, optimizer, scheduler = setup()
    losses = steps(model, stream, optimizer, scheduler, 0, 6, loss_weighting="sample")
    assert losses[-1] < losses[0]
    assert losses[0] == steps(*setup(), 0, 1)[0]  # the first loss (before any update) is the same token mean


@pytest.mark.parametrize(("setting", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_evaluation_during_training_generates_in_the_stage_dtype(
    monkeypatch: pytest.MonkeyPatch, setting: str, dtype: torch.dtype
) -> None:
    """A stage trained in float32 is evaluated in float32, whatever this machine's default dtype is."""
    import dataclasses

    import mm15.eval.runner
    from mm15.hardware import fast_dtype
    from mm15.train.config import load_recipe
    from mm15.train.run import evaluate_during_training

    seen: list[torch.dtype] = []

    class Report:
        def scores(self) -> dict[str, float]:
            return {"category/general": 1.0}

    def fake_evaluate(*args: object, **kwargs: object) -> Report:
        seen.append(fast_dtype())
        return Report()

    monkeypatch.setattr(mm15.eval.runner, "evaluate", fake_evaluate)
    tiny = load_recipe(Path(__file__).parent.parent / "recipes" / "tiny.yaml")
    stage = dataclasses.replace(tiny.stage("sft"), autocast=setting)
    model = MM15Model.build(preset("tiny"))
    assert evaluate_during_training(model, stage, step=1) == {"category/general": 1.0}
    assert seen == [dtype] and model.training


def reference_mixture(state: dict) -> dict[str, float]:
    used = state["used"]
    return {name: used.get(name, 0) / sum(used.values()) for name in ("general", "ground")}


def stream_start_state(seed: int) -> dict:
    return setup(seed=seed)[1].state_dict()


@pytest.mark.parametrize("mode", ["inline", "thread", "process"])
def test_prefetcher_hands_out_the_stream_order_and_state(mode: PrefetchMode) -> None:
    """In every mode the micro-batches, the checkpointed data position and the counts the log reads
    are the stream's own."""
    _, reference, _, _ = setup(seed=5)
    expected = []
    for _ in range(3):
        micro = reference.next_micro()
        expected.append((micro.batch.input_ids.clone(), micro.pixel_values, reference.state_dict()))
    _, stream, _, _ = setup(seed=5)
    data = Prefetcher(stream, mode=mode)
    try:
        assert data.state_dict() == stream_start_state(seed=5)
        for ids, pixels, state in expected:
            micro = data.next_micro()
            assert torch.equal(micro.batch.input_ids, ids) and torch.equal(micro.pixel_values, pixels)
            assert data.state_dict() == state  # the position after the last micro-batch handed out
            assert data.sampler.state_dict() == state["mixture"]  # the realised mixture the log reads
            assert dict(data.skipped) == state["skipped"]
            assert data.realised_mixture() == reference_mixture(state)
    finally:
        data.close()


@pytest.mark.parametrize("mode", ["inline", "thread", "process"])
def test_prefetcher_raises_the_streams_error_in_the_caller(mode: PrefetchMode) -> None:
    _, stream, _, _ = setup()

    def broken() -> None:
        raise CorruptDataError("3 of 4 samples could not be decoded")

    stream.next_micro = broken  # type: ignore[method-assign]
    data = Prefetcher(stream, mode=mode)
    try:
        with pytest.raises(CorruptDataError, match="could not be decoded"):
            data.next_micro()
    finally:
        data.close()


class AwkwardError(Exception):
    """An exception whose __init__ takes other arguments than it passes up: it pickles but does not
    unpickle, like many a third-party library's."""

    def __init__(self, path: str, line: int) -> None:
        super().__init__(f"{path}: line {line} is awkward")


@pytest.mark.parametrize(
    "error",
    [
        SourceError("shards/a.jsonl", "line 3", "bad_json", "Expecting value", record_id="r7"),
        ImageDecodeError("shards/a/7.png", "truncated PNG"),
        ImageTooLargeError("big.png", "200000000 pixels, over the limit"),
        VideoError("clip.mp4", "no video stream"),
        SampleTooLong("r7", 5000, 2048, "text and 9 images"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_data_errors_survive_pickling_as_themselves(error: Exception) -> None:
    """The data worker process sends its errors as pickles: each typed error must come back as itself,
    fields and notes included, not as a TypeError from its __init__."""
    error.add_note("a note")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error) and back.__notes__ == ["a note"]


def _worker_error(raised: Exception | None) -> Exception:
    """What the training process receives when the data worker's stream raises ``raised`` (or, with
    None, returns a micro-batch that cannot be pickled)."""
    _, stream, _, _ = setup()

    def broken() -> object:
        if raised is not None:
            raise raised
        return lambda: None

    stream.next_micro = broken  # type: ignore[method-assign]
    data = Prefetcher(stream, mode="process")
    try:
        with pytest.raises(Exception) as info:
            data.next_micro()
    finally:
        data.close()
    return info.value


def test_a_typed_error_in_the_data_worker_arrives_with_the_workers_traceback() -> None:
    error = _worker_error(SourceError("shards/a.jsonl", "line 3", "bad_json", "Expecting value"))
    assert isinstance(error, SourceError) and (error.reason, error.location) == ("bad_json", "line 3")
    (note,) = error.__notes__
    assert note.startswith("raised in the data worker process:") and "in broken" in note


def test_an_error_that_cannot_cross_processes_becomes_a_runtime_error_naming_it() -> None:
    error = _worker_error(AwkwardError("a.jsonl", 3))
    assert type(error) is RuntimeError
    assert str(error).startswith("data worker: AwkwardError: a.jsonl: line 3 is awkward could not be sent")
    assert "in broken" in error.__notes__[0]


def test_a_micro_batch_that_cannot_be_pickled_is_an_error_not_a_dead_worker() -> None:
    error = _worker_error(None)
    assert type(error) is RuntimeError
    assert str(error).startswith("data worker: a micro-batch could not be sent to the training process")


@pytest.mark.parametrize(
    ("setting", "forks", "mode"),
    [
        ("auto", True, "process"),
        ("auto", False, "inline"),
        ("thread", True, "thread"),
        ("inline", True, "inline"),
        ("process", True, "process"),
    ],
)
def test_prefetch_setting_uses_a_worker_process_where_it_can_fork(
    monkeypatch: pytest.MonkeyPatch, setting: str, forks: bool, mode: str
) -> None:
    import mm15.train.run

    monkeypatch.setattr(mm15.train.run, "can_fork_workers", lambda: forks)
    assert mm15.train.run.prefetch_mode(setting) == mode
    with pytest.raises(ValueError, match=r"data\.prefetch"):
        mm15.train.run.prefetch_mode("workers")


def test_unknown_prefetch_mode_is_a_clear_error() -> None:
    _, stream, _, _ = setup()
    with pytest.raises(ValueError, match="prefetch mode"):
        Prefetcher(stream, mode="processes")  # type: ignore[arg-type]


def test_closing_a_data_worker_with_a_full_queue_lets_it_exit_by_itself() -> None:
    """At the end of a stage the worker has micro-batches queued that nobody will read. close() must
    let it exit on its own (code 0) instead of waiting out its timeout and terminating it."""
    _, stream, _, _ = setup()
    data = Prefetcher(stream, depth=2, mode="process")
    data.next_micro()
    deadline = time.monotonic() + 60
    while data._queue.qsize() < 2 and time.monotonic() < deadline:  # the worker has filled the queue
        time.sleep(0.05)
    assert data._queue.qsize() == 2
    data.close()
    assert data._worker.exitcode == 0


ORPHAN_SCRIPT = """
import time
from mm15.train.data import Prefetcher

class Stream:  # what Prefetcher reads of a TrainStream; its micro-batches fill the queue at once
    sampler, skipped, source_names = None, {}, []
    def state_dict(self):
        return {"mixture": None, "skipped": {}}
    def next_micro(self):
        return b"micro-batch"

data = Prefetcher(Stream(), depth=2, mode="process")
print(data._worker.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited, waiting only for a parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_data_worker_exits_when_its_training_process_is_killed() -> None:
    """SIGKILL gives the training process no chance to close its worker, whose queue then stays full:
    the orphan must notice and exit rather than hold its memory forever."""
    trainer = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    assert trainer.stdout is not None
    worker = int(trainer.stdout.readline())
    time.sleep(0.5)  # the worker has filled the queue and waits for room
    assert _alive(worker)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphaned = _alive(worker)
    if orphaned:
        os.kill(worker, signal.SIGKILL)  # leave no process behind when the test fails
    assert not orphaned, "the orphaned data worker is still running"


def test_a_dead_data_worker_is_an_error_not_a_hang() -> None:
    _, stream, _, _ = setup()

    def killed() -> None:
        os._exit(3)  # as if the kernel killed the worker

    stream.next_micro = killed  # type: ignore[method-assign]
    data = Prefetcher(stream, mode="process")
    try:
        with pytest.raises(RuntimeError, match="exited \\(code 3\\)"):
            data.next_micro()
    finally:
        data.close()
