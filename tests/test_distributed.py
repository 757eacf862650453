"""Data-parallel training: DDP and FSDP2 on 2 CPU ranks give the single-process losses; checkpoints cross.

The multi-process tests run ``tests/dist_worker.py`` under ``torchrun --nproc_per_node 2`` (gloo, one
thread per rank). The global batch has two image samples and two text-only ones; rank 1 gets only the
text-only ones, so it has no image at all and far fewer supervised tokens than rank 0 -- the two cases
that break naive data parallelism (a hang on the unused vision branch, a wrong loss mean).

Tolerances (3 AdamW steps of the tiny model, losses ~5.8 -> 4.9): fp32 DDP and FSDP2 against one process
rtol 1e-5 on every step's global loss (measured: ~1e-7; the ranks pack different rows and sum gradients
in a different order, so bit-equality is not expected) and rtol 1e-6 on the parameter checksum;
FSDP2 with bf16 parameters / fp32 reduction rtol 2e-3 (measured ~4e-4); checkpoint resume across
world sizes and strategies (one process, DDP, FSDP2, either way) rtol 1e-5 against the uninterrupted
run's next-step loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mm15.train import distributed as D

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT = 180
FP32_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children first), from /proc: torchrun puts each rank in its own session."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def run_bounded(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``command`` (torchrun and its ranks) for at most TIMEOUT seconds.

    On a timeout the ranks get SIGABRT, so that Python's fault handler (``PYTHONFAULTHANDLER``) prints
    where each was stuck, then every process gets SIGKILL and the test fails with their output.
    ``subprocess.run``'s own timeout kills torchrun alone: the ranks live on, hold the output pipes
    open, and what they printed is lost.
    """
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**env, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        ranks = _descendants(proc.pid)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(3)  # let the fault handlers write
        for pid in [proc.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT} s: {' '.join(command)}\n{stdout[-3000:]}\n{stderr[-8000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_worker(tmp: Path, name: str, *args: str, procs: int = 2) -> dict:
    out = tmp / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    for _attempt in range(3):
        if procs == 1:
            command = [sys.executable, str(WORKER)]
        else:
            torchrun = Path(sys.executable).with_name("torchrun")
            command = [
                str(torchrun),
                "--nproc_per_node",
                str(procs),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(_free_port()),
                str(WORKER),
            ]
        done = run_bounded([*command, *args, "--out", str(out)], env)
        # The free port can be taken between picking it and torchrun binding it: pick another. Any
        # other failure is reported at once.
        if done.returncode == 0 or "address already in use" not in (done.stdout + done.stderr).lower():
            break
    # Long tails: a rank that aborts prints faulthandler's list of extension modules (several KB) after
    # the error that explains it, and a 3,000-character tail once showed only that list.
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-20000:]}\n{done.stderr[-20000:]}"
    result = json.loads(out.read_text())
    result["seconds"] = time.perf_counter() - start
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: one process, the whole global batch, 3 steps."""
    return run_worker(tmp_path_factory.mktemp("single"), "none", "--strategy", "none", procs=1)


def assert_same_run(result: dict, reference: dict, rtol: float, checksum_rtol: float) -> None:
    assert result["global_tokens"] == reference["global_tokens"]
    assert result["local_tokens"] != result["global_tokens"] / 2  # the ranks really are unequal
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=rtol, atol=0)
    assert len(set(result["rank_checksums"])) == 1, result["rank_checksums"]  # replicas identical
    assert result["checksum"] == pytest.approx(reference["checksum"], rel=checksum_rtol)


# ------------------------------------------------------------------------------------- in-process tests


def test_scale_for_global_mean_gives_the_global_token_mean() -> None:
    torch.manual_seed(0)
    weight = torch.randn(5, 3, requires_grad=True)
    inputs, targets = torch.randn(11, 3), torch.randint(0, 5, (11,))
    # Unequal shards, as after packing: 8 tokens on rank 0, 3 on rank 1.
    shards = [(inputs[:8], targets[:8]), (inputs[8:], targets[8:])]
    expected = torch.autograd.grad(F.cross_entropy(inputs @ weight.T, targets), weight)[0]
    world, total = len(shards), len(targets)
    grads, naive = [], []
    for x, y in shards:
        naive.append(torch.autograd.grad(F.cross_entropy(x @ weight.T, y), weight)[0])
        local = F.cross_entropy(x @ weight.T, y)
        grads.append(torch.autograd.grad(D.scale_for_global_mean(local, len(y), total, world), weight)[0])
    averaged = sum(grads) / world  # what DDP's all-reduce (and FSDP2's reduce-scatter) computes
    torch.testing.assert_close(averaged, expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(sum(naive) / world, expected, rtol=1e-3)  # unscaled averaging is wrong
    empty = F.cross_entropy(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    zero = D.scale_for_global_mean(empty, 0, total, world)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ValueError, match="global_count"):
        D.scale_for_global_mean(empty, 0, 0, world)


def test_single_process_helpers() -> None:
    info = D.init_distributed() if "WORLD_SIZE" not in os.environ else None
    assert info is None or (info.world_size == 1 and not info.is_distributed)
    assert D.global_token_count(7) == 7
    assert D.all_ranks_have_data(True) and not D.all_ranks_have_data(False)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, "none") is model and D.unwrap(model) is model
    with pytest.raises(ValueError, match="unknown strategy"):
        D.wrap_model(model, "zero3")
    with pytest.raises(RuntimeError, match="process group"):
        D.wrap_model(model, "ddp")


@pytest.fixture(scope="module")
def tiny_text_only():
    from mm15.chat import ChatEncoder
    from mm15.data.packing import collate
    from mm15.data.synth import generate
    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset

    torch.manual_seed(0)
    model = MM15Model.build(preset("tiny")).train()
    encoder = ChatEncoder(model.tokenizer, model.cfg.image, max_length=1024)
    batch = collate([encoder.encode(generate("text-only", 0), [])], model.tokenizer.pad_token_id, 1024)
    return model, batch


def _loss(model, batch) -> torch.Tensor:
    out = model(**batch.model_inputs())
    return out.token_losses.mean()


def test_touch_unused_branches_gives_every_trainable_parameter_a_zero_gradient(tiny_text_only) -> None:
    model, batch = tiny_text_only
    model.zero_grad(set_to_none=True)
    loss = _loss(model, batch)
    vision = [*model.vision.parameters(), *model.connector.parameters()]
    touched = D.touch_unused_branches(model, loss)
    assert touched.item() == loss.item()
    touched.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(torch.count_nonzero(p.grad) == 0 for p in vision)
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.llm.parameters())


def test_image_guard_runs_the_encoder_on_text_only_batches(tiny_text_only) -> None:
    model, batch = tiny_text_only
    with torch.no_grad():
        before = _loss(model, batch)
    D.install_image_guard(model)
    D.install_image_guard(model)  # idempotent: one pair of hooks
    model.zero_grad(set_to_none=True)
    loss = _loss(model, batch)
    assert loss.item() == before.item()
    # Every encoder/connector parameter is in the graph, so DDP/FSDP2 see a (zero) gradient.
    reached = D._reached_parameters(loss)
    unused = {id(q) for _, q in D.never_used_parameters(model)}
    used_vision = [p for p in model.vision.parameters() if id(p) not in unused]
    assert all(id(p) in reached for p in [*used_vision, *model.connector.parameters()])
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.connector.parameters())
    names = {name for name, _ in D.never_used_parameters(model)}
    assert names == {"vision.model.post_layernorm.weight", "vision.model.post_layernorm.bias"}


# ---------------------------------------------------------------------------------- multi-process tests


def test_ddp_matches_single_process(single: dict, tmp_path: Path) -> None:
    ddp = run_worker(tmp_path, "ddp", "--strategy", "ddp")
    assert_same_run(ddp, single, rtol=FP32_RTOL, checksum_rtol=1e-6)


def test_fsdp2_matches_single_process(single: dict, tmp_path: Path) -> None:
    fsdp = run_worker(tmp_path, "fsdp2", "--strategy", "fsdp2")
    assert_same_run(fsdp, single, rtol=FP32_RTOL, checksum_rtol=1e-6)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_stays_close(single: dict, tmp_path: Path) -> None:
    fsdp = run_worker(tmp_path, "fsdp2_bf16", "--strategy", "fsdp2", "--bf16")
    assert_same_run(fsdp, single, rtol=2e-3, checksum_rtol=1e-3)
    assert fsdp["losses"] != single["losses"]  # bf16 really was used


# Two directions run by default (2 ranks -> 1 and 1 -> 2 ranks with the other key scheme); the rest
# with the slow tests.
@pytest.mark.parametrize(
    ("save", "load"),
    [
        ("ddp", "none"),
        pytest.param("none", "ddp", marks=pytest.mark.slow),
        pytest.param("fsdp2", "none", marks=pytest.mark.slow),
        ("none", "fsdp2"),
        pytest.param("fsdp2", "ddp", marks=pytest.mark.slow),
    ],
)
def test_checkpoint_crosses_world_sizes(single: dict, tmp_path: Path, save: str, load: str) -> None:
    """Save after 2 steps on one world size, resume on the other: step 3 equals the uninterrupted run's.

    FSDP2 keys its optimizer state by parameter name, one process and DDP by index: loading translates
    (it refused FSDP2 <-> the others), so a sharded run's checkpoint resumes replicated and back."""
    ckpt = tmp_path / "ckpt"
    saved = run_worker(
        tmp_path,
        f"save-{save}",
        *("--strategy", save, "--steps", "2", "--save-dir", str(ckpt), "--save-at", "2"),
        procs=1 if save == "none" else 2,
    )
    torch.testing.assert_close(saved["losses"], single["losses"][:2], rtol=FP32_RTOL, atol=0)
    resumed = run_worker(
        tmp_path,
        f"load-{load}",
        *("--strategy", load, "--steps", "1", "--load", str(ckpt / "step-00000002")),
        procs=1 if load == "none" else 2,
    )
    assert resumed["start_step"] == 2
    assert json.loads((ckpt / "step-00000002" / "meta.json").read_text())["optimizer_keys"] == (
        "fqn" if save == "fsdp2" else "index"
    )
    torch.testing.assert_close(resumed["losses"], single["losses"][2:], rtol=FP32_RTOL, atol=0)
    assert resumed["checksum"] == pytest.approx(single["checksum"], rel=1e-6)


# ------------------------------------------------------------------------------------ mm15 train, 2 ranks


def test_sample_sources_give_each_rank_its_own_slice() -> None:
    from mm15.train.data import SampleSource

    def ids(rank: int, world: int, n: int) -> list[str]:
        source = SampleSource("synth:general", rank=rank, world_size=world)
        return [source.next().id for _ in range(n)]

    one = ids(0, 1, 8)
    ranks = [ids(0, 2, 4), ids(1, 2, 4)]
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]  # disjoint, and together the 1-rank stream
    with pytest.raises(ValueError, match="rank < world_size"):
        SampleSource("synth:general", rank=2, world_size=2)


def test_a_shard_source_repeats_its_passes_without_keeping_them(tmp_path: Path) -> None:
    """Pass after pass in the same order (each rank its slice), re-read from disk each time: the first
    pass is not held in memory, which grew training by the whole data set's size."""
    import tracemalloc

    from mm15.data.sample import Sample, Turn
    from mm15.data.sources import write_shards
    from mm15.train.data import SampleSource

    payload = bytes(range(256)) * 2048  # 512 KB of image bytes per sample
    samples = [
        Sample(f"s{i}", [Turn("user", "<image>"), Turn("assistant", "x")], "general", "t", images=[payload])
        for i in range(10)
    ]
    write_shards(samples, tmp_path, samples_per_shard=3)
    tracemalloc.start()
    try:
        one = SampleSource(f"shards:{tmp_path}")
        assert [one.next().id for _ in range(25)] == [f"s{i % 10}" for i in range(25)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    two = [SampleSource(f"shards:{tmp_path}", rank=r, world_size=2) for r in (0, 1)]
    assert [two[0].next().id for _ in range(10)] == [f"s{i % 10}" for i in range(0, 20, 2)]
    assert [two[1].next().id for _ in range(10)] == [f"s{i % 10}" for i in range(1, 20, 2)]
    assert held < 3 * len(payload), f"{held / 1e6:.1f} MB still held after two and a half passes"


def test_buffer_shuffle_emits_every_sample_once_in_a_seeded_order() -> None:
    import random

    from mm15.train.data import buffer_shuffle

    items = list(range(100))
    a = list(buffer_shuffle(items, 16, random.Random("s")))
    assert sorted(a) == items and a != items
    assert a == list(buffer_shuffle(items, 16, random.Random("s")))  # seeded: the same order again
    assert a != list(buffer_shuffle(items, 16, random.Random("t")))
    assert list(buffer_shuffle(items, 1, random.Random("s"))) == items  # no buffer: file order
    assert sorted(buffer_shuffle(items[:5], 16, random.Random("s"))) == items[:5]  # fewer than the buffer


def test_a_shuffled_shard_source_is_reproducible_per_rank_and_on_resume(tmp_path: Path) -> None:
    from mm15.data.sample import Sample, Turn
    from mm15.data.sources import write_shards
    from mm15.train.data import SampleSource

    samples = [Sample(f"s{i}", [Turn("user", "q"), Turn("assistant", "a")], "text", "t") for i in range(20)]
    write_shards(samples, tmp_path, samples_per_shard=4)
    spec = f"shards:{tmp_path}"

    def ids(source: SampleSource, n: int) -> list[str]:
        return [source.next().id for _ in range(n)]

    stream = ids(SampleSource(spec, seed=1, shuffle_buffer=8), 60)
    passes = [stream[0:20], stream[20:40], stream[40:60]]
    assert all(sorted(p) == sorted(s.id for s in samples) for p in passes)  # each pass: every sample once
    assert passes[0] != [s.id for s in samples] and passes[0] != passes[1]  # shuffled, anew each pass
    assert ids(SampleSource(spec, seed=1, shuffle_buffer=8), 60) == stream
    assert ids(SampleSource(spec, seed=2, shuffle_buffer=8), 20) != passes[0]
    ranks = [ids(SampleSource(spec, seed=1, rank=r, world_size=2, shuffle_buffer=8), 30) for r in (0, 1)]
    assert ranks[0] == stream[0::2] and ranks[1] == stream[1::2]
    resumed = SampleSource(spec, seed=1, shuffle_buffer=8)
    resumed.seek(27)  # what a checkpoint restores
    assert ids(resumed, 33) == stream[27:]
    # Once a pass's length is known (a checkpoint carries it), a resume reads only the current pass.
    reads = 0
    counted = SampleSource(spec, seed=1, shuffle_buffer=8)
    real_read = counted.reader._read_shard

    def read_shard(shard: Path) -> Any:
        nonlocal reads
        for sample in real_read(shard):
            reads += 1
            yield sample

    counted.reader._read_shard = read_shard  # type: ignore[method-assign]
    counted.pass_length = 20
    counted.seek(47)
    assert ids(counted, 13) == stream[47:]
    assert reads == 20  # pass 2 alone: up to sample 7 it must fill the buffer, then it reads on to 60
    moved = tmp_path.parent / f"{tmp_path.name}-moved"  # the data folder moved between runs
    shutil.copytree(tmp_path, moved)
    assert ids(SampleSource(f"shards:{moved}", seed=1, shuffle_buffer=8), 60) == stream


def _train_command(recipe: Path, out: Path, *extra: str) -> list[str]:
    """``mm15 train`` under ``torchrun`` on 2 ranks (a fresh port each time)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), "-m", "mm15.cli", "train", str(recipe), "--out", str(out)]
    return [*command, *extra]


TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _train(tmp: Path, recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    for _attempt in range(3):
        done = run_bounded(_train_command(recipe, out, *extra), TRAIN_ENV)
        if done.returncode == 0 or "address already in use" not in (done.stdout + done.stderr).lower():
            break
    return done


def _first_stage_recipe(path: Path, **fields: Any) -> Path:
    """recipes/tiny.yaml's first stage alone, with ``fields`` changed, written to ``path``."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["stages"] = [{**recipe["stages"][0], **fields}]
    path.write_text(yaml.safe_dump(recipe))
    return path


def _losses(run: Path) -> list[float]:
    lines = (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_mm15_train_under_torchrun_ddp_resumes_exactly(tmp_path: Path) -> None:
    """``mm15 train`` on 2 ranks: the loss falls, and a resume from step 2 repeats steps 3-4 exactly."""
    fields = {
        "max_steps": 4,
        "save_every": 2,
        "keep_last": 3,
        "schedule": {"warmup_steps": 1, "min_lr_ratio": 0.1},
    }
    path = _first_stage_recipe(tmp_path / "recipe.yaml", **fields)

    whole = _train(tmp_path, path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]
    assert "2 ranks, strategy ddp" in whole.stdout
    reference = _losses(tmp_path / "whole")
    assert len(reference) == 4 and reference[-1] < reference[0]
    checkpoints = tmp_path / "whole" / "pretrain" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]

    # The same run interrupted after step 2: drop what steps 3-4 wrote, resume.
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "pretrain" / "final")
    shutil.rmtree(tmp_path / "cut" / "pretrain" / "checkpoints" / "step-00000004")
    resumed = _train(tmp_path, path, tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _losses(tmp_path / "cut") == reference  # bit-identical: same ranks, data and reductions

    fsdp = _train(tmp_path, path, tmp_path / "fsdp", "--strategy", "fsdp2")
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    # FSDP2 resumes exactly too (its strict optimizer load refused every resume: AdamW keeps no state
    # for the encoder's never-updated post-layernorm).
    shutil.rmtree(tmp_path / "fsdp" / "pretrain" / "final")
    shutil.rmtree(tmp_path / "fsdp" / "pretrain" / "checkpoints" / "step-00000004")
    sharded = _losses(tmp_path / "fsdp")
    again = _train(tmp_path, path, tmp_path / "fsdp", "--strategy", "fsdp2", "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    assert _losses(tmp_path / "fsdp") == sharded
    # FSDP2 with AdamW trains; with AdaFactor it is refused:
    adafactor = _first_stage_recipe(
        tmp_path / "adafactor.yaml", **fields, optimizer={"name": "adafactor", "lr": 1e-3}
    )
    refused = _train(tmp_path, adafactor, tmp_path / "bad2", "--strategy", "fsdp2")
    assert refused.returncode != 0 and "adafactor does not support FSDP2" in refused.stdout


def test_resolve_strategy() -> None:
    from mm15.train.run import resolve_strategy

    assert resolve_strategy("auto", 1) == "none" and resolve_strategy("auto", 2) == "ddp"
    assert resolve_strategy("fsdp2", 2) == "fsdp2" and resolve_strategy("none", 4) == "none"
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        resolve_strategy("ddp", 1)
    with pytest.raises(ValueError, match="unknown strategy 'zero3'"):
        resolve_strategy("zero3", 2)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaching one rank first: all ranks stop after the same step, a checkpoint of
    it is written, and a resume on 2 ranks repeats the uninterrupted run's losses exactly."""
    schedule = {"warmup_steps": 1, "min_lr_ratio": 0.1}
    path = _first_stage_recipe(tmp_path / "recipe.yaml", max_steps=8, save_every=1000, schedule=schedule)
    whole = _train(tmp_path, path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]

    run = tmp_path / "stopped"
    proc = subprocess.Popen(
        _train_command(path, run),
        cwd=ROOT,
        env=TRAIN_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = run / "pretrain" / "metrics.jsonl"
        deadline = time.time() + TIMEOUT
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "not 3 steps in time"
            time.sleep(0.05)
        (rank1,) = [
            pid
            for pid in _descendants(proc.pid)
            if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)
        ]
        os.kill(rank1, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    steps = len(_losses(run))
    assert 3 <= steps < 8 and proc.returncode != 0, stdout[-3000:] + stderr[-3000:]
    assert f"stopped on SIGTERM after step {steps} of 8" in " ".join(stdout.split()), stdout[-3000:]
    checkpoint = run / "pretrain" / "checkpoints" / f"step-{steps:08d}"
    assert (checkpoint / "meta.json").is_file()

    resumed = _train(tmp_path, path, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _losses(run) == _losses(tmp_path / "whole")


def test_a_data_error_on_one_rank_ends_the_run_instead_of_hanging(tmp_path: Path) -> None:
    """A sample over the budget (``over_budget: error``) stops the rank that draws it. That rank waited
    in a barrier on its way out while the other waited in the step's all-reduce: both sat there until
    gloo's 30-minute timeout. Now it leaves at once, exit 3, and torchrun stops the other rank."""
    import yaml

    recipe = yaml.safe_load(ONE_RANK_OVER_BUDGET)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    started = time.monotonic()
    done = _train(tmp_path, path, tmp_path / "run")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "over the budget of 512" in output, output[-4000:]
    assert time.monotonic() - started < TIMEOUT / 2, "the ranks waited for each other"
    steps = len(_losses(tmp_path / "run"))
    assert steps < 10, "no sample over the budget: the test needs one"


ONE_RANK_OVER_BUDGET = """
name: over-budget
model: {preset: tiny}
seed: 0
stages:
  - name: pretrain
    parent: init
    trainable: [encoder, connector, llm]
    optimizer: {name: adamw, lr: 1.0e-3}
    autocast: fp32
    schedule: {warmup_steps: 1}
    global_batch: 4
    micro_batch: 2
    max_steps: 10
    eval_every: 0
    save_every: 10
    data:
      seq_length: 512
      prefetch: inline
      over_budget: error
      mixture: {caption: 50, interleaved: 10, text: 40}
      sources: {text: "synth:text-only"}
    image: {split: false}
"""


def test_a_moe_run_on_two_ranks_resumes_exactly_and_sums_its_mixture_over_ranks(tmp_path: Path) -> None:
    """Router jitter draws from each rank's generator: with rank 0's RNG restored on both ranks the
    resumed losses drifted (5.017347 against 5.017329). And the summary's realised mixture was rank
    0's samples alone; it is every rank's."""
    import yaml

    recipe = yaml.safe_load(ONE_RANK_OVER_BUDGET)
    recipe["model"] = {"preset": "tiny", "overrides": {"moe": {"num_experts": 4, "router_jitter": 0.2}}}
    stage = recipe["stages"][0]
    stage.update(max_steps=4, save_every=2, keep_last=3, trainable=["encoder", "connector", "llm", "routers"])
    stage["data"].update(seq_length=1024, over_budget="drop", mixture={"caption": 1, "text": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    whole = _train(tmp_path, path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-4000:]
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "pretrain" / "final")
    shutil.rmtree(tmp_path / "cut" / "pretrain" / "checkpoints" / "step-00000004")
    resumed = _train(tmp_path, path, tmp_path / "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")

    last = tmp_path / "whole" / "pretrain" / "checkpoints" / "step-00000004" / "extra_state.json"
    used: dict[str, int] = {}
    for rank in json.loads(last.read_text())["data"]["ranks"]:
        for name, count in rank["used"].items():
            used[name] = used.get(name, 0) + count
    assert sum(used.values()) == 4 * 4  # steps x global batch
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())[0]
    assert summary["mixture"] == pytest.approx({name: count / 16 for name, count in used.items()})
