"""Mixture trees, the MM1.5 presets, and the deterministic, resumable per-rank sampler."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from mm15.data.mixture import (
    OCR_SOURCES,
    ROOT,
    MixtureNode,
    MixtureSampler,
    effective_weights,
    ocr_mixture,
    pretrain_mixture,
    sft_mixture,
)
from mm15.data.sample import CATEGORIES

N_DRAWS = 20_000
# Realised fractions must lie within 4.5 binomial standard deviations of the target:
# |p_hat - p| <= 4.5 * sqrt(p * (1 - p) / n). A correct sampler fails this with probability ~7e-6 per source
# (and the draws are deterministic from the seed, so a pass is stable).
N_SIGMA = 4.5

# mm15-spec.md section 3.3, final effective weights (% of all SFT samples).
SFT_TABLE = {
    "text-rich": 37.2,
    "refer-ground": 22.5,
    "general": 11.3,
    "math": 5.6,
    "code": 2.3,
    "science": 1.1,
    "multi-image": 10.0,
    "text-only": 10.0,
}


def assert_matches(realised: dict[str, float], target: dict[str, float], n: int) -> None:
    for source, p in target.items():
        tol = N_SIGMA * math.sqrt(p * (1 - p) / n)
        assert abs(realised[source] - p) <= tol, (source, realised[source], p, tol)


# ------------------------------------------------------------------------------------------- presets


def test_sft_effective_weights_match_spec_table() -> None:
    probs = effective_weights(sft_mixture())
    assert set(probs) == set(SFT_TABLE)
    for source, percent in SFT_TABLE.items():
        assert abs(100 * probs[source] - percent) <= 0.1, (source, 100 * probs[source], percent)
        # Stronger: each derived weight rounds to the table entry.
        assert round(100 * probs[source], 1) == pytest.approx(percent), source
    assert sum(probs.values()) == pytest.approx(1.0)
    single = sum(probs[c] for c in ("text-rich", "refer-ground", "general", "math", "code", "science"))
    assert single == pytest.approx(0.8)


def test_sft_alpha_ratios_relative_to_general() -> None:
    probs = effective_weights(sft_mixture())
    for category, alpha in {"science": 0.1, "math": 0.5, "code": 0.2, "refer-ground": 2.0}.items():
        assert probs[category] / probs["general"] == pytest.approx(alpha)


def test_pretrain_and_ocr_presets() -> None:
    assert effective_weights(pretrain_mixture()) == pytest.approx(
        {"caption": 0.5, "interleaved": 0.1, "text": 0.4}
    )
    assert effective_weights(ocr_mixture()) == pytest.approx(dict.fromkeys(OCR_SOURCES, 0.25))
    assert effective_weights(ocr_mixture(["a", "b", "c"])) == pytest.approx(dict.fromkeys("abc", 1 / 3))


def test_from_dict_round_trip_and_nesting() -> None:
    spec = {"single-image": {"weight": 0.8, "children": {"text-rich": 3, "general": 1}}, "text-only": 0.2}
    node = MixtureNode.from_dict(spec, available=CATEGORIES)
    assert MixtureNode.from_dict(node.to_dict()) == node
    assert effective_weights(node) == pytest.approx({"text-rich": 0.6, "general": 0.2, "text-only": 0.2})
    # Weights are relative: scaling siblings changes nothing.
    scaled_spec = {
        "single-image": {"weight": 8, "children": {"text-rich": 30, "general": 10}},
        "text-only": 2,
    }
    scaled = MixtureNode.from_dict(scaled_spec)
    assert effective_weights(scaled) == pytest.approx(effective_weights(node))


def test_huge_weights_keep_their_ratios() -> None:
    # Their sum overflowed to inf: every share became 0 and the sampler failed with an IndexError.
    node = MixtureNode.from_dict(
        {"a": 1e308, "b": 1e308, "c": {"weight": 1e308, "children": {"x": 1.5e308, "y": 0.5e308}}}
    )
    assert effective_weights(node) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "x": 0.25, "y": 1 / 12})
    assert set(MixtureSampler(node, seed=0).take(50)) == {"a", "b", "x", "y"}


def test_zero_weight_leaf_is_never_drawn() -> None:
    node = MixtureNode.from_dict({"a": 1, "b": 0, "c": 1})
    assert effective_weights(node)["b"] == 0.0
    sampler = MixtureSampler(node, seed=3)
    assert "b" not in sampler.take(2000)
    assert sampler.counts["b"] == 0


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"single-image": {"weight": 0.8, "children": {"general": 1, "math": -1}}, "text-only": 0.1},
            "mixture.single-image.math: weight must be >= 0, got -1",
        ),
        ({"general": float("nan"), "math": 1}, "mixture.general: weight must be a finite number, got nan"),
        ({"general": float("inf"), "math": 1}, "mixture.general: weight must be a finite number"),
        ({"general": "heavy"}, "mixture.general: weight must be a number"),
        ({"general": True}, "mixture.general: weight must be a number"),
        (
            {"a": {"weight": 1, "children": {"general": 0, "math": 0}}, "b": 1},
            "mixture.a: children weights are all zero",
        ),
        ({"general": 0, "math": 0}, "mixture: children weights are all zero"),
        ({"a": {"weight": 1, "children": {}}, "general": 1}, "mixture.a: group has no children"),
        ({"a": {}, "general": 1}, "mixture.a: group has no children"),
        ({}, "mixture: group has no children"),
        ({"a": {"weight": 1, "childs": {"general": 1}}}, "mixture.a: unknown keys ['childs']"),
        ({"a": {"children": [1, 2]}}, "mixture.a: children must be a mapping"),
        (
            {"single-image": {"weight": 1, "children": {"genral": 1}}},
            "mixture.single-image.genral: unknown source 'genral'",
        ),
    ],
)
def test_validation_errors_name_the_path(spec: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        MixtureNode.from_dict(spec, available=CATEGORIES)
    assert message in str(err.value)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="math: weight must be >= 0"):
        MixtureNode("math", -0.5)
    with pytest.raises(ValueError, match="g: group has no children"):
        MixtureNode("g", 1.0, ())
    with pytest.raises(ValueError, match="duplicate child names"):
        MixtureNode("g", 1.0, (MixtureNode("a"), MixtureNode("a")))
    with pytest.raises(ValueError, match=r"mixture\.x: unknown source 'x'"):
        MixtureNode(ROOT, 1.0, (MixtureNode("x"),)).check_sources({"y"})


def test_sampler_argument_validation() -> None:
    node = ocr_mixture()
    with pytest.raises(ValueError, match=r"MixtureSampler\.rank must be < world_size"):
        MixtureSampler(node, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"MixtureSampler\.world_size must be >= 1"):
        MixtureSampler(node, seed=0, world_size=0)
    with pytest.raises(ValueError, match=r"MixtureSampler\.seed must be an int"):
        MixtureSampler(node, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs equal effective weights"):
        MixtureSampler(pretrain_mixture(), seed=0).next_batch(10)


# ------------------------------------------------------------------------------------ realised mixture


@pytest.mark.parametrize("make", [sft_mixture, pretrain_mixture, ocr_mixture], ids=["sft", "pretrain", "ocr"])
def test_realised_mixture_matches_effective_weights(make) -> None:
    node = make()
    sampler = MixtureSampler(node, seed=1234)
    draws = sampler.take(N_DRAWS)
    assert sampler.total == N_DRAWS
    assert sampler.counts == {s: Counter(draws)[s] for s in sampler.probs}
    assert_matches(sampler.realised(), effective_weights(node), N_DRAWS)
    report = sampler.report()
    assert report["total"] == N_DRAWS
    assert all(abs(row["z"]) <= N_SIGMA for row in report["sources"].values())
    table = sampler.format_report()
    assert all(source in table for source in sampler.probs)


def test_reset_counts_keeps_stream() -> None:
    a, b = MixtureSampler(sft_mixture(), seed=5), MixtureSampler(sft_mixture(), seed=5)
    a.take(100)
    b.take(100)
    a.reset_counts()
    assert a.total == 0 and all(v == 0.0 for v in a.realised().values())
    assert a.take(50) == b.take(50)
    assert a.total == 50


# ------------------------------------------------------------------------ determinism, ranks, resume


def test_determinism_from_seed() -> None:
    node = sft_mixture()
    assert MixtureSampler(node, seed=7).take(500) == MixtureSampler(node, seed=7).take(500)
    assert MixtureSampler(node, seed=7).take(500) != MixtureSampler(node, seed=8).take(500)


def test_ranks_differ_but_are_reproducible() -> None:
    node = sft_mixture()
    streams = [MixtureSampler(node, seed=7, rank=r, world_size=4).take(500) for r in range(4)]
    again = [MixtureSampler(node, seed=7, rank=r, world_size=4).take(500) for r in range(4)]
    assert streams == again
    assert len({tuple(s) for s in streams}) == 4
    # Independent, not shifted copies: rank 1 is not rank 0 offset by a few draws.
    for shift in range(1, 10):
        assert streams[1][: 500 - shift] != streams[0][shift:]


def test_state_restore_continues_identical_sequence() -> None:
    node = sft_mixture()
    sampler = MixtureSampler(node, seed=11, rank=1, world_size=2)
    sampler.take(1000)
    state = json.loads(json.dumps(sampler.state_dict()))  # as through a checkpoint
    expected = sampler.take(500)
    resumed = MixtureSampler(node, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert resumed.counts == state["counts"]
    assert resumed.take(500) == expected
    assert resumed.counts == sampler.counts


def test_state_restore_balanced_mode() -> None:
    sampler = MixtureSampler(ocr_mixture(), seed=2, rank=0, world_size=2)
    for _ in range(7):
        sampler.next_batch(6)
    sampler.take(3)
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = [sampler.next_batch(6) for _ in range(5)] + [sampler.take(10)]
    resumed = MixtureSampler(ocr_mixture(), seed=2, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(6) for _ in range(5)] + [resumed.take(10)] == expected


def test_strict_load_rejects_mismatched_state() -> None:
    state = MixtureSampler(sft_mixture(), seed=1, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="rank"):
        MixtureSampler(sft_mixture(), seed=1, rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler(sft_mixture(), seed=2, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="mixture"):
        MixtureSampler(pretrain_mixture(), seed=1, rank=0, world_size=2).load_state_dict(state)
    # Non-strict keeps the counters for a changed mixture.
    other = MixtureSampler(pretrain_mixture(), seed=1, rank=0, world_size=2)
    other.load_state_dict(state | {"step": 42}, strict=False)
    assert other.state_dict()["step"] == 42


# --------------------------------------------------------------------------------- balanced batches


@pytest.mark.parametrize("batch_size", [4, 8, 256])
def test_balanced_batches_exact_when_multiple_of_sources(batch_size: int) -> None:
    sampler = MixtureSampler(ocr_mixture(), seed=0)
    for _ in range(20):
        batch = sampler.next_batch(batch_size)
        assert Counter(batch) == dict.fromkeys(OCR_SOURCES, batch_size // 4)
    assert sampler.realised() == dict.fromkeys(OCR_SOURCES, 0.25)


def test_balanced_batches_as_equal_as_possible_otherwise() -> None:
    sampler = MixtureSampler(ocr_mixture(), seed=0)
    total: Counter[str] = Counter()
    for _ in range(50):
        batch = sampler.next_batch(6)  # 6 = 4 + 2: two sources get one extra, rotating
        counts = Counter(batch)
        assert sorted(counts[s] for s in OCR_SOURCES) == [1, 1, 2, 2]
        total.update(batch)
        assert max(total.values()) - min(total[s] for s in OCR_SOURCES) <= 1


def test_balanced_batches_across_ranks() -> None:
    world = 3
    samplers = [MixtureSampler(ocr_mixture(), seed=9, rank=r, world_size=world) for r in range(world)]
    for _ in range(10):
        batches = [s.next_batch(5) for s in samplers]
        for batch in batches:  # each rank's batch is balanced on its own ...
            assert max(Counter(batch).values()) - min(Counter(batch)[s] for s in OCR_SOURCES) <= 1
        union = Counter(x for b in batches for x in b)  # ... and so is the global batch of 15
        assert sorted(union[s] for s in OCR_SOURCES) == [3, 4, 4, 4]
    # Within-batch order is shuffled per rank, and reproducible.
    again = MixtureSampler(ocr_mixture(), seed=9, rank=1, world_size=world)
    fresh = MixtureSampler(ocr_mixture(), seed=9, rank=1, world_size=world)
    assert [again.next_batch(8) for _ in range(5)] == [fresh.next_batch(8) for _ in range(5)]


def test_balanced_batches_are_shuffled_within_the_window() -> None:
    """Each batch holds its window of the source cycle in a shuffled order: read straight, one rank's
    batches of 4 would give the 4 sources in the same fixed pattern at every step."""
    sampler = MixtureSampler(ocr_mixture(), seed=9)
    cycle = list(sampler._order)
    batches = [sampler.next_batch(4) for _ in range(20)]
    assert all(sorted(b) == sorted(cycle) for b in batches)  # the window: every source once
    orders = {tuple(b) for b in batches}
    assert len(orders) >= 5  # 20 shuffles of 4 (24 orders) in at least 5 different orders
    assert sum(b == cycle for b in batches) <= 5


@pytest.mark.parametrize(("world", "batch_size"), [(2, 2), (2, 1), (2, 3), (4, 1)])
def test_every_rank_draws_every_source_evenly(world: int, batch_size: int) -> None:
    # When batch_size * world is a multiple of the 4 sources, a fixed split of each global batch gave
    # every rank the same sources forever (rank 0 never read half of them); with 3 per batch and 2 ranks
    # a rank's totals drifted 2:1.
    samplers = [MixtureSampler(ocr_mixture(), seed=5, rank=r, world_size=world) for r in range(world)]
    totals = [Counter[str]() for _ in range(world)]
    for _ in range(40):
        batches = [s.next_batch(batch_size) for s in samplers]
        union = Counter(x for b in batches for x in b)
        n = batch_size * world
        assert max(union.values()) - min(union[s] for s in OCR_SOURCES) <= (0 if n % 4 == 0 else 1)
        for total, batch in zip(totals, batches, strict=True):
            total.update(batch)
            assert max(total.values()) - min(total[s] for s in OCR_SOURCES) <= 1
    assert all(set(total) == set(OCR_SOURCES) for total in totals)
