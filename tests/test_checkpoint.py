"""Checkpoints: exact resume, RNG restore, keep-last-N, crash safety, no unpickling, clear mismatches."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import mm15.train.checkpoint as ckpt
from mm15.train.checkpoint import export_final, latest_checkpoint, load_checkpoint, save_checkpoint

VOCAB = 16


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    # Ops this small are dominated by intra-op thread hand-offs; on a shared, busy CPU two threads made each
    # step ~100x slower. One thread also keeps the exact-equality checks independent of the machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyLM(nn.Module):
    """Embedding -> residual MLP with dropout -> head tied to the embedding (exercises tied weights)."""

    def __init__(self, dim: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.2), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(h + self.mlp(h))


Run = tuple[TinyLM, torch.optim.Optimizer, LambdaLR]


def make_run(seed: int, hidden: int = 16, one_group: bool = False) -> Run:
    torch.manual_seed(seed)
    model = TinyLM(hidden=hidden)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = (
        [{"params": list(model.parameters())}]
        if one_group
        else [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    )
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    scheduler = LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    return model, optimizer, scheduler


def train(run: Run, steps: int) -> list[float]:
    """Steps whose batches and loss draw from the torch, numpy and Python RNGs, so all three must resume."""
    model, optimizer, scheduler = run
    model.train()
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 6))
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        logits = model(tokens)
        loss = scale * F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def save(run: Run, directory: Path, step: int, keep_last: int = 3, **extra: object) -> Path:
    model, optimizer, scheduler = run
    return save_checkpoint(directory, step, model, optimizer, scheduler, {"step": step, **extra}, keep_last)


def edit_meta(path: Path, **changes: object) -> None:
    """Change meta.json's entries; a value None removes the entry."""
    meta = json.loads((path / "meta.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (path / "meta.json").write_text(json.dumps(meta))


def rewrite(path: Path, name: str, data: bytes | str) -> None:
    """Replace a checkpoint file and its recorded checksum: as if the checkpoint had been written so."""
    target = path / name
    target.write_text(data) if isinstance(data, str) else target.write_bytes(data)
    sums = json.loads((path / "meta.json").read_text())["sha256"]
    edit_meta(path, sha256={**sums, name: hashlib.sha256(target.read_bytes()).hexdigest()})


def test_resume_continues_the_identical_loss_curve(tmp_path: Path) -> None:
    seed_all(0)
    run = make_run(seed=0)
    train(run, 3)
    extra = {"data": {"version": 1, "step": 3, "counts": {"pdfa": 2}}, "losses": [1.5, 1.25], "cfg": (1, "a")}
    path = save_checkpoint(tmp_path, 3, *run, extra_state=extra, keep_last=2)
    assert path == tmp_path / "step-00000003"
    expected_losses = train(run, 4)
    expected_params = {k: v.clone() for k, v in run[0].state_dict().items()}

    fresh = make_run(seed=123)  # different init and RNG: everything must come from the checkpoint
    step, extra_state = load_checkpoint(latest_checkpoint(tmp_path), *fresh)
    assert step == 3
    assert extra_state == extra  # tuples survive the JSON round trip
    assert fresh[2].last_epoch == 3
    assert train(fresh, 4) == expected_losses
    for key, value in fresh[0].state_dict().items():
        assert torch.equal(value, expected_params[key]), key
    assert fresh[0].head.weight is fresh[0].embed.weight  # loading keeps the tie


def test_rng_states_are_restored(tmp_path: Path) -> None:
    seed_all(1)
    np.random.randn(1)  # leaves a cached Gaussian in numpy's legacy state
    random.gauss(0.0, 1.0)  # and in Python's
    run = make_run(seed=1)
    save(run, tmp_path, 0)

    def draws() -> tuple[list[float], list[float], list[float]]:
        return (
            torch.rand(5).tolist(),
            [random.random() for _ in range(3)] + [random.gauss(0.0, 1.0)],
            np.random.rand(3).tolist() + np.random.randn(2).tolist(),
        )

    after_save = draws()
    seed_all(99)
    load_checkpoint(tmp_path / "step-00000000", *make_run(seed=2))
    assert draws() == after_save


def test_each_rank_gets_its_own_random_state_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's states alone were saved and restored on every rank: ranks that had drawn different
    amounts of random numbers (MoE router jitter) did not resume exactly. On another world size every
    rank takes rank 0's."""
    run = make_run(seed=1)
    seed_all(7)
    rank1 = ckpt._capture_rng()
    seed_all(3)
    rank0 = ckpt._capture_rng()
    monkeypatch.setattr(ckpt, "_gather_rng", lambda state: [state, rank1])  # as 2 ranks would gather
    path = save(run, tmp_path, 1)
    monkeypatch.undo()

    monkeypatch.setattr(ckpt, "_dist_initialised", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    for world, expected in ((2, rank1), (3, rank0)):
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda world=world: world)
        seed_all(99)
        load_checkpoint(path, *make_run(seed=2))
        assert torch.equal(torch.get_rng_state(), expected["torch_cpu"]), world
        assert random.getstate()[1] == tuple(expected["python"][1]), world


def test_keep_last_n_and_stale_temp_dirs(tmp_path: Path) -> None:
    run = make_run(seed=0)
    stale = tmp_path / ".tmp-step-00000002-killed"  # what a save killed by SIGKILL leaves behind
    stale.mkdir(parents=True)
    (stale / "meta.json").write_text("{}")
    for step in range(1, 6):
        save(run, tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    # Re-saving an existing step replaces it atomically.
    save(run, tmp_path, 5, keep_last=2, note="again")
    assert load_checkpoint(tmp_path / "step-00000005", *make_run(seed=0))[1]["note"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_incomplete_dirs_are_not_checkpoints(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    run = make_run(seed=0)
    save(run, tmp_path, 1)
    (tmp_path / "step-00000009").mkdir()  # e.g. a half-copied directory without meta.json
    (tmp_path / ".tmp-step-00000010-x").mkdir()
    with pytest.warns(UserWarning, match="incomplete"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    with pytest.raises(FileNotFoundError, match="not a complete"):
        load_checkpoint(tmp_path / "step-00000009", *make_run(seed=0))


@pytest.mark.parametrize("failing", ["save_file", "rename"])
def test_crash_mid_save_keeps_previous_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    run = make_run(seed=0)
    train(run, 1)
    save(run, tmp_path, 1)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash: disk full")

    with monkeypatch.context() as patch:
        if failing == "save_file":
            patch.setattr(ckpt, "save_file", crash)
        else:
            patch.setattr(ckpt.os, "rename", crash)
        with pytest.raises(OSError, match="simulated crash"):
            save(run, tmp_path, 2)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no partial dir left either
    assert load_checkpoint(latest_checkpoint(tmp_path), *make_run(seed=5))[0] == 1


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(seed=0)
    train(run, 2)
    path = save(run, tmp_path, 2)
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 2 and meta["format_version"] == ckpt.FORMAT_VERSION
    assert sorted(meta["files"]) == sorted(p.name for p in path.iterdir() if p.name != "meta.json")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load must never unpickle")

    for module, name in [(pickle, "loads"), (pickle, "load"), (torch, "load")]:
        monkeypatch.setattr(module, name, forbidden)
    assert load_checkpoint(path, *make_run(seed=1))[0] == 2


def test_mismatches_raise_clearly_and_change_nothing(tmp_path: Path) -> None:
    run = make_run(seed=0)
    train(run, 1)
    path = save(run, tmp_path, 1)

    wider = make_run(seed=0, hidden=32)
    before = {k: v.clone() for k, v in wider[0].state_dict().items()}
    with pytest.raises(
        ValueError, match=r"shape mismatch:\n  mlp\.0\.weight: checkpoint \[16, 8\] vs model \[32, 8\]"
    ):
        load_checkpoint(path, *wider)
    assert all(torch.equal(v, before[k]) for k, v in wider[0].state_dict().items())

    with pytest.raises(ValueError, match="2 param groups, this optimizer 1"):
        load_checkpoint(path, *make_run(seed=0, one_group=True))


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize(
    ("damaged", "how"),
    [
        ("model.safetensors", "truncate"),
        ("optimizer.safetensors", "truncate"),
        ("scheduler.json", "garble"),
        ("extra_state.json", "garble"),
        ("rng.safetensors", "garble"),
    ],
)
def test_damaged_files_raise_corrupt_checkpoint_and_change_nothing(
    tmp_path: Path, damaged: str, how: str, checksums: bool
) -> None:
    """A checkpoint complete when written but damaged since: its own error type, nothing changed. The
    SHA-256 check names the file; a checkpoint from before the checksums fails when the file is read."""
    run = make_run(seed=0)
    train(run, 1)
    path = save(run, tmp_path, 1)
    if not checksums:
        edit_meta(path, sha256=None)
    target = path / damaged
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\xff\x00" + data[2:])
    fresh = make_run(seed=5)
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
    message = (
        f"{path.name}: {damaged} is damaged" if checksums else f"{path.name}: a checkpoint file cannot be"
    )
    with pytest.raises(ckpt.CorruptCheckpointError, match=message):
        load_checkpoint(path, *fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh[0].state_dict().items())
    assert fresh[1].state_dict()["state"] == {}  # the optimizer was not touched either


@pytest.mark.parametrize("damage", ["python word dropped", "numpy words dropped", "python missing"])
def test_an_rng_state_that_cannot_be_restored_is_corrupt_before_anything_changes(
    tmp_path: Path, damage: str
) -> None:
    # It failed only after the weights were loaded (107 of 109 tensors overwritten), with an error
    # that --resume did not take for a damaged checkpoint, so it did not fall back to an earlier one.
    run = make_run(seed=0)
    train(run, 1)
    path = save(run, tmp_path, 1)
    rng = json.loads((path / "rng.json").read_text())
    if damage == "python word dropped":
        rng["python"][1] = rng["python"][1][:-1]
    elif damage == "numpy words dropped":
        rng["numpy"]["keys"] = rng["numpy"]["keys"][:100]
    else:
        del rng["python"]
    rewrite(path, "rng.json", json.dumps(rng))
    fresh = make_run(seed=5)
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
    with pytest.raises(ckpt.CorruptCheckpointError, match="the RNG state cannot be restored"):
        load_checkpoint(path, *fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh[0].state_dict().items())


def test_a_scheduler_state_without_its_position_is_refused(tmp_path: Path) -> None:
    """Readable JSON that lacks "last_epoch" loaded silently and restarted the schedule's warm-up."""
    import json

    run = make_run(seed=0)
    train(run, 2)
    path = save(run, tmp_path, 2)
    state = json.loads((path / "scheduler.json").read_text())
    del state["last_epoch"]
    rewrite(path, "scheduler.json", json.dumps(state))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"scheduler state lacks \['last_epoch'\]"):
        load_checkpoint(path, *make_run(seed=5))


def test_non_json_state_is_refused_before_writing(tmp_path: Path) -> None:
    run = make_run(seed=0)
    with pytest.raises(TypeError, match=r"extra_state: value at metrics\.loss is a torch\.Tensor"):
        save(run, tmp_path, 1, metrics={"loss": torch.tensor(1.0)})
    with pytest.raises(TypeError, match=r"extra_state: value at cfg has type object"):
        save(run, tmp_path, 1, cfg=object())
    assert list(tmp_path.iterdir()) == []


def test_export_final(tmp_path: Path) -> None:
    model = make_run(seed=0)[0]
    out = export_final(model, tmp_path / "plain")
    assert (out / "model.safetensors").is_file()

    class WithPretrained(TinyLM):
        def save_pretrained(self, path: Path) -> None:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "config.json").write_text("{}")

    assert (export_final(WithPretrained(), tmp_path / "hf") / "config.json").is_file()
    export_final(model, tmp_path / "other", rank=1)  # only rank 0 writes
    assert not (tmp_path / "other").exists()


def test_an_export_killed_part_way_leaves_no_final_directory(tmp_path: Path) -> None:
    # save_pretrained wrote config.json first, straight into final/: a kill before the weights left a
    # final/ that later runs took for a finished stage.
    class DiesMidway(TinyLM):
        def save_pretrained(self, path: Path) -> None:
            (Path(path) / "config.json").write_text("{}")
            raise KeyboardInterrupt  # as a kill would stop it, after the config

    with pytest.raises(KeyboardInterrupt):
        export_final(DiesMidway(), tmp_path / "final")
    assert list(tmp_path.iterdir()) == []  # neither final/ nor its staging directory
    out = export_final(make_run(seed=0)[0], tmp_path / "final")
    assert (out / "model.safetensors").is_file() and oct(out.stat().st_mode & 0o777) == "0o755"
    export_final(make_run(seed=1)[0], out)  # a second export replaces the first whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_adafactor_checkpoint_resumes(tmp_path: Path) -> None:
    # Adafactor's factored second moments keep the factored dimension with size 1 ([n, 1], [1, m]); the
    # shape check refused every Adafactor checkpoint (the tiny recipe's OCR stage, the paper's stages
    # 2 and 3).
    def adafactor_run(seed: int) -> Run:
        torch.manual_seed(seed)
        model = TinyLM()
        optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
        return model, optimizer, LambdaLR(optimizer, lambda s: 1.0)

    seed_all(0)
    run = adafactor_run(0)
    train(run, 2)
    save(run, tmp_path, 2)
    expected = train(run, 3)
    fresh = adafactor_run(5)
    load_checkpoint(latest_checkpoint(tmp_path), *fresh)
    assert train(fresh, 3) == expected


# ------------------------------------------------------------------------------------------- checksums


def test_a_garbled_block_in_the_weights_fails_its_checksum(tmp_path: Path) -> None:
    # 4 KiB XOR-ed in the middle of the tensor data leave a file that parses: it was loaded and trained on.
    run = make_run(seed=0, hidden=1024)  # ~70 KB of weights, so the block lies inside one tensor's data
    train(run, 1)
    path = save(run, tmp_path, 1)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    middle = (header_end + len(data)) // 2
    assert middle - 2048 > header_end + 1024
    data[middle - 2048 : middle + 2048] = bytes(b ^ 0x5A for b in data[middle - 2048 : middle + 2048])
    target.write_bytes(bytes(data))

    assert latest_checkpoint(tmp_path) == path  # listing does not hash; loading does
    fresh = make_run(seed=5, hidden=1024)
    before = {k: v.clone() for k, v in fresh[0].state_dict().items()}
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"step-00000001: model\.safetensors is damaged"):
        load_checkpoint(path, *fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh[0].state_dict().items())
    assert fresh[1].state_dict()["state"] == {}

    edit_meta(path, sha256=None)  # without the checksum the damage goes unnoticed, as it did
    load_checkpoint(path, *fresh)
    assert any(not torch.equal(v, run[0].state_dict()[k]) for k, v in fresh[0].state_dict().items())


def test_a_checkpoint_without_checksums_still_loads_exactly(tmp_path: Path) -> None:
    seed_all(0)
    run = make_run(seed=0)
    train(run, 2)
    path = save(run, tmp_path, 2)
    meta = json.loads((path / "meta.json").read_text())
    assert sorted(meta["sha256"]) == meta["files"]
    assert all(
        meta["sha256"][n] == hashlib.sha256((path / n).read_bytes()).hexdigest() for n in meta["files"]
    )
    expected = train(run, 3)
    edit_meta(path, sha256=None)  # as written before the checksums existed
    fresh = make_run(seed=5)
    assert load_checkpoint(path, *fresh)[0] == 2
    assert train(fresh, 3) == expected


def test_checkpoints_get_the_modes_the_umask_gives(tmp_path: Path) -> None:
    # mkdtemp's 0700 and safetensors' 0600 hid checkpoints from the group that shares a run directory.
    run = make_run(seed=0)
    train(run, 1)
    old = os.umask(0o027)
    try:
        path = save(run, tmp_path, 1)
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == "0o750"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in path.iterdir()}
    assert set(modes.values()) == {"0o640"}, modes
    assert "model.safetensors" in modes and "optimizer.safetensors" in modes


# -------------------------------------------------------------------------------- optimizer key translation


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's
def test_optimizer_state_translates_between_name_and_index_keys() -> None:
    """FSDP2 saves optimizer state keyed by parameter name, one process and DDP by index: each converts
    into the other exactly, a parameter without state (it never had a gradient) included."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    seed_all(0)
    model, optimizer, scheduler = make_run(seed=0)
    train((model, optimizer, scheduler), 1)
    loss = model(torch.randint(0, VOCAB, (2, 5))).square().mean()
    optimizer.zero_grad()
    loss.backward()
    model.mlp[0].bias.grad = None  # this step leaves it out: it keeps its state from step 1
    optimizer.step()
    fresh_model, fresh_optimizer, _ = make_run(seed=0)
    stateless = fresh_model.mlp[3].bias
    fresh_model(torch.randint(0, VOCAB, (2, 5))).square().mean().backward()
    stateless.grad = None  # never stepped: AdamW keeps no state for it
    fresh_optimizer.step()

    for mdl, opt in [(model, optimizer), (fresh_model, fresh_optimizer)]:
        by_index = opt.state_dict()
        by_name = get_optimizer_state_dict(mdl, opt)  # what FSDP2 saves (full state, same names)
        assert isinstance(next(iter(by_name["state"])), str)
        to_index = ckpt._rekey_optimizer_state(by_name, "fqn", mdl, opt, "index")
        assert to_index == by_index
        assert ckpt._rekey_optimizer_state(to_index, "index", mdl, opt, "fqn") == by_name
        assert ckpt._rekey_optimizer_state(by_name, None, mdl, opt, "fqn") == by_name  # keys told apart
        # A compiled module's names carry _orig_mod.; the canonical ones do not.
        compiled = torch.compile(mdl)
        assert ckpt._rekey_optimizer_state(by_name, "fqn", compiled, opt, "index") == by_index
    names = ckpt._parameter_names(fresh_model)
    assert names[id(stateless)] not in get_optimizer_state_dict(fresh_model, fresh_optimizer)["state"]
    assert names[id(fresh_model.head.weight)] == "embed.weight"  # tied: its first name, once

    renamed = get_optimizer_state_dict(model, optimizer)
    renamed["param_groups"][1]["params"][0] = "mlp.9.bias"
    with pytest.raises(ValueError, match=r"group 1 lists other parameters .*\['mlp\.9\.bias'\]"):
        ckpt._rekey_optimizer_state(renamed, "fqn", model, optimizer, "index")


def test_a_name_keyed_checkpoint_resumes_on_one_process(tmp_path: Path) -> None:
    """A checkpoint whose optimizer state is keyed by name (FSDP2's) resumes a one-process run exactly;
    it was refused ("keyed by parameter fqn")."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    seed_all(0)
    run = make_run(seed=0)
    train(run, 2)
    path = save(run, tmp_path, 2)
    for name in ("optimizer.json", "optimizer.safetensors"):
        (path / name).unlink()
    ckpt._write_component(path, "optimizer", get_optimizer_state_dict(run[0], run[1]), {})
    expected = train(run, 3)
    sums = {
        n: hashlib.sha256((path / n).read_bytes()).hexdigest()
        for n in json.loads((path / "meta.json").read_text())["files"]
    }
    edit_meta(path, optimizer_keys="fqn", sha256=sums)
    fresh = make_run(seed=5)
    assert load_checkpoint(path, *fresh)[0] == 2
    assert train(fresh, 3) == expected


BAD_META = [
    # (what, meta.json changes, the reason the warning and the load give)
    ("step not a number", {"step": "x"}, "meta.json's step must be an integer >= 0, got 'x'"),
    ("step a bool", {"step": True}, "meta.json's step must be an integer >= 0, got True"),
    ("negative step", {"step": -2}, "meta.json's step must be an integer >= 0, got -2"),
    ("step of another directory", {"step": 7}, "meta.json's step 7 is not the directory's 2"),
    ("no step", {"step": None}, "meta.json's step must be an integer >= 0, got None"),
    ("no files", {"files": None}, "meta.json's files must be a list of file names, got None"),
    ("files a string", {"files": "model.safetensors"}, "meta.json's files must be a list of file names"),
    ("a path out of the folder", {"files": ["../meta.json"]}, "meta.json's files must be a list of file"),
    ("sha256 a list", {"sha256": ["00"]}, "meta.json's sha256 entry is not a mapping"),
    ("a file without sha256", {"sha256": {}}, "meta.json records no valid SHA-256 for extra_state.json"),
    ("a sha256 not hex", "bad digest", "meta.json records no valid SHA-256 for model.safetensors (got 'x')"),
    ("unknown optimizer keys", {"optimizer_keys": "names"}, "meta.json's optimizer_keys must be 'index'"),
]


@pytest.mark.parametrize(("what", "changes", "reason"), BAD_META, ids=[b[0] for b in BAD_META])
def test_a_meta_with_a_bad_entry_is_an_incomplete_checkpoint(
    tmp_path: Path, what: str, changes: dict[str, object] | str, reason: str
) -> None:
    """A meta.json with the right format but a step of "x" counted as complete: --resume --check promised
    the resume, and the load then failed on int("x") instead of falling back to the step before."""
    run = make_run(seed=0)
    save(run, tmp_path, 1)
    bad = save(run, tmp_path, 2)
    if changes == "bad digest":
        sums = json.loads((bad / "meta.json").read_text())["sha256"]
        changes = {"sha256": {**sums, "model.safetensors": "x"}}
    assert isinstance(changes, dict)
    edit_meta(bad, **changes)
    with pytest.warns(
        UserWarning, match=re.escape(f"ignoring incomplete checkpoint directory {bad} ({reason}")
    ):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{bad} is not a complete mm15 checkpoint ({reason}")
    ):
        load_checkpoint(bad, *make_run(seed=0))


def test_resume_check_falls_back_past_a_checkpoint_with_a_bad_step(tmp_path: Path) -> None:
    """``mm15 train R --out DIR --resume --check`` names the checkpoint the run would resume from: the
    one before a checkpoint whose meta.json step is "x", with the reason that one is skipped."""
    import yaml
    from typer.testing import CliRunner

    from mm15.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "resume",
                "model": {"preset": "tiny"},
                "stages": [
                    {
                        "name": "pretrain",
                        "global_batch": 2,
                        "micro_batch": 2,
                        "max_steps": 4,
                        "data": {"seq_length": 1024, "mixture": {"text-only": 1}},
                    }
                ],
            }
        )
    )
    checkpoints = tmp_path / "run" / "pretrain" / "checkpoints"
    run = make_run(seed=0)
    save(run, checkpoints, 1)
    edit_meta(save(run, checkpoints, 2), step="x")
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "--resume", "--check"]
    with pytest.warns(
        UserWarning, match=r"step-00000002 \(meta\.json's step must be an integer >= 0, got 'x'\)"
    ):
        result = CliRunner().invoke(app, args)
    flat = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "pretrain: resume at step 1" in flat, flat
