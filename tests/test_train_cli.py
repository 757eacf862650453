"""``mm15 train``: the tiny recipe's three stages on a reduced budget, and an exact resume after SIGKILL."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent

ONE_STAGE = """
name: killtest
model: {preset: tiny}
seed: 3
stages:
  - name: pretrain
    parent: init
    trainable: [encoder, connector, llm]
    optimizer: {name: adamw, lr: 1.0e-3}
    schedule: {warmup_steps: 2}
    global_batch: 2
    micro_batch: 2
    max_steps: 8
    save_every: 2
    keep_last: 2
    data:
      seq_length: 1024
      mixture: {caption: 1, text: 1}
      sources: {text: "synth:text-only"}
    image: {split: false}
"""


def mm15(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mm15.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def losses(run: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()
    ]


def train_to_the_end(recipe: Path, out: Path, *extra: str) -> str:
    """``mm15 train`` run to completion (exit code 0); its output."""
    process = mm15("train", str(recipe), "--out", str(out), *extra)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def test_tiny_recipe_three_stages_on_a_reduced_budget(tmp_path: Path) -> None:
    process = mm15("train", "recipes/tiny.yaml", "--out", str(tmp_path), "--max-steps", "5")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    for stage in ("pretrain", "ocr", "sft"):
        history = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert len(history) == 5
        assert history[-1]["loss"] < history[0]["loss"], (stage, [h["loss"] for h in history])
        assert (tmp_path / stage / "final" / "model.safetensors").is_file()
        assert (tmp_path / stage / "loss.png").stat().st_size > 1000
        # TensorBoard holds the same per-step numbers as metrics.jsonl.
        board = EventAccumulator(str(tmp_path / stage / "tensorboard"))
        board.Reload()
        logged = [e.value for e in board.Scalars(f"{stage}/loss")]
        assert logged == pytest.approx([h["loss"] for h in history], rel=1e-6)
        assert {f"{stage}/lr", f"{stage}/mfu", f"{stage}/data_wait"} <= set(board.Tags()["scalars"])
    sft_board = EventAccumulator(str(tmp_path / "sft" / "tensorboard"))
    sft_board.Reload()
    assert any(tag.startswith("sft/eval/") for tag in sft_board.Tags()["scalars"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| pretrain | 5 |" in summary and "| sft | 5 |" in summary
    # Evaluation during training: the SFT stage evaluates at its end (eval_every, capped budget).
    assert not (tmp_path / "pretrain" / "eval.jsonl").read_text()  # eval_every: 0
    (evaluated,) = [json.loads(x) for x in (tmp_path / "sft" / "eval.jsonl").read_text().splitlines()]
    categories = {"general", "text-rich", "knowledge", "refer-ground", "multi-image", "in-context"}
    assert evaluated["step"] == 5 and {f"category/{c}" for c in categories} <= set(evaluated)
    assert all(0 <= v <= 100 for k, v in evaluated.items() if k.startswith("category/"))
    assert "| sft | 5 |" in summary.split("Evaluation at the end of each stage")[1]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_stage_then_resume_gives_the_same_losses(tmp_path: Path) -> None:
    recipe = tmp_path / "killtest.yaml"
    recipe.write_text(ONE_STAGE)
    straight = tmp_path / "straight"
    train_to_the_end(recipe, straight)

    killed = tmp_path / "killed"
    process = mm15("train", str(recipe), "--out", str(killed))
    checkpoint = killed / "pretrain" / "checkpoints" / "step-00000004"
    deadline = time.time() + 300
    while not (checkpoint / "meta.json").is_file():
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, "no checkpoint at step 4 in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "pretrain" / "final").exists()  # it really died mid-stage

    resumed = mm15("train", str(recipe), "--out", str(killed), "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert losses(killed) == losses(straight)  # exactly: same data, same RNG, same arithmetic
    assert len(losses(killed)) == 8
    # The realised mixture of the trained micro-batches (caption : text = 1 : 1), whichever process made
    # them: the data worker's draws once never reached the summary, which said 0 for every source.
    (row,) = json.loads((straight / "summary.json").read_text())
    assert set(row["mixture"]) == {"caption", "text"} and sum(row["mixture"].values()) == pytest.approx(1)

    # The newest checkpoint damaged after it was written (say, a bad disk or copy): --resume reports it,
    # falls back to the one before and replays the steps since, with the same losses.
    shutil.rmtree(killed / "pretrain" / "final")
    weights = killed / "pretrain" / "checkpoints" / "step-00000008" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    again = mm15("train", str(recipe), "--out", str(killed), "--resume")
    output, _ = again.communicate(timeout=600)
    assert again.returncode == 0, output
    flat = " ".join(output.split())
    assert "skipping an unreadable checkpoint" in flat and "step-00000008" in flat, output
    assert "resumed from" in flat and "step-00000006 at step 6" in flat, output
    assert losses(killed) == losses(straight)

    # A recipe whose mixture changed since the checkpoint cannot continue its data stream: it says so.
    shutil.rmtree(killed / "pretrain" / "final")
    changed = tmp_path / "changed.yaml"
    changed.write_text(ONE_STAGE.replace("mixture: {caption: 1, text: 1}", "mixture: {caption: 1, text: 3}"))
    refused = mm15("train", str(changed), "--out", str(killed), "--resume")
    output, _ = refused.communicate(timeout=600)
    assert refused.returncode == 2, output
    flat = " ".join(output.split())
    assert "the stage's data has changed since this checkpoint" in flat, output
    assert "resume with the recipe it was written with" in flat and "Traceback" not in output


def _wait_for_steps(process: subprocess.Popen, run: Path, steps: int) -> None:
    """Until ``run``'s pretrain stage has logged ``steps`` steps (the process must still be running)."""
    metrics = run / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, process.communicate()[0]
        assert time.time() < deadline, f"not {steps} steps in time"
        time.sleep(0.05)


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    recipe = tmp_path / "long.yaml"
    recipe.write_text(
        ONE_STAGE.replace("max_steps: 8", "max_steps: 100000").replace("save_every: 2", "save_every: 1000")
    )
    run = tmp_path / "run"
    # A shell that starts the tests in the background ignores SIGINT, and children inherit that. Its own
    # session, so that the signal goes to the process group as a terminal's Ctrl+C does: the data worker
    # gets it too and must live on until the training process has finished its step.
    process = mm15(
        "train",
        str(recipe),
        "--out",
        str(run),
        "--max-steps",
        "5000",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        start_new_session=True,
    )
    _wait_for_steps(process, run, 3)
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    steps = len(losses(run))
    flat = " ".join(output.split())
    assert f"stopped on SIGINT after step {steps} of 5000 of stage 'pretrain'" in flat, output
    assert f"mm15 train {recipe} --out {run} --max-steps 5000 --resume" in flat, output
    assert "Traceback" not in output and "data worker" not in output
    # save_every is 1000: the only checkpoint is the one the signal asked for.
    checkpoints = run / "pretrain" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == [f"step-{steps:08d}"]
    with pytest.raises(ProcessLookupError):  # nothing of the process group is left behind
        os.killpg(process.pid, 0)


def test_sigterm_mid_stage_stops_with_a_checkpoint_and_resumes_exactly(tmp_path: Path) -> None:
    recipe = tmp_path / "termtest.yaml"
    recipe.write_text(ONE_STAGE.replace("save_every: 2", "save_every: 1000"))
    straight = tmp_path / "straight"
    train_to_the_end(recipe, straight)

    stopped = tmp_path / "stopped"
    process = mm15("train", str(recipe), "--out", str(stopped))
    _wait_for_steps(process, stopped, 3)
    process.send_signal(signal.SIGTERM)  # as a cluster scheduler preempts a job
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    steps = len(losses(stopped))
    assert 3 <= steps < 8, output
    assert f"stopped on SIGTERM after step {steps} of 8" in " ".join(output.split()), output
    assert not (stopped / "pretrain" / "final").exists()

    output = train_to_the_end(recipe, stopped, "--resume")
    assert f"at step {steps}" in " ".join(output.split()), output
    assert losses(stopped) == losses(straight)  # exactly: same data, same RNG, same arithmetic


def test_a_checkpoint_that_cannot_be_written_stops_the_stage_and_its_data_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the second save: StageFailed naming the step and the last complete checkpoint,
    and the data worker process is stopped with the stage (as on any error)."""
    import multiprocessing

    from rich.console import Console

    import mm15.train.run as run_module
    from mm15.train.config import RecipeConfig

    real_save = run_module.save_checkpoint
    saves = 0

    def save_until_the_disk_fills(*args: object, **kwargs: object) -> Path:
        nonlocal saves
        saves += 1
        if saves == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(run_module, "save_checkpoint", save_until_the_disk_fills)
    recipe = RecipeConfig.from_dict(
        yaml.safe_load(ONE_STAGE.replace("seq_length: 1024", "seq_length: 1024\n      prefetch: process"))
    )
    with pytest.raises(run_module.StageFailed) as info:
        run_module.run_recipe(recipe, Console(quiet=True), out=tmp_path / "run")
    message = str(info.value)
    assert "cannot write the checkpoint of step 4 ([Errno 28] No space left on device)" in message
    kept = tmp_path / "run" / "pretrain" / "checkpoints" / "step-00000002"
    assert message.endswith(f"the last complete one is {kept}; fix that and continue with --resume")
    assert multiprocessing.active_children() == []


def test_one_run_directory_has_one_writer(tmp_path: Path) -> None:
    """A second training process on a run directory in use stops at once, naming the holder's pid; the
    lock goes with its holder, so a killed run leaves none behind."""
    from rich.console import Console

    from mm15.train.config import RecipeConfig
    from mm15.train.run import run_dir_lock, run_recipe

    run = tmp_path / "run"
    run.mkdir()
    hold = (
        "import pathlib, time\n"
        "from mm15.train.run import run_dir_lock\n"
        f"with run_dir_lock(pathlib.Path({str(run)!r})):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        recipe = RecipeConfig.from_dict(yaml.safe_load(ONE_STAGE))
        with pytest.raises(ValueError, match=f"is in use by another training process \\(pid {holder.pid}\\)"):
            run_recipe(recipe, Console(quiet=True), out=run)
        assert not (run / "pretrain").exists()  # nothing was written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_dir_lock(run):  # the killed holder's lock is gone
        pass


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from mm15.train.run import run_dir_lock

    def no_locks(*args: object) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    entered = False
    warned = pytest.warns(UserWarning, match="No locks available.*nothing stops a second run")
    with warned, run_dir_lock(tmp_path):
        entered = True
    assert entered


def test_summary_keeps_the_rows_of_stages_run_separately(tmp_path: Path) -> None:
    from mm15.train.config import load_recipe
    from mm15.train.run import _write_summary

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")

    def row(stage: str, loss: float) -> dict:
        return {
            "stage": stage,
            "steps": 2,
            "first_loss": loss,
            "last_loss": loss / 2,
            "tokens_per_s": 1.0,
            "data_wait": 0.0,
            "skipped": {},
        }

    _write_summary(tmp_path, recipe, [row("sft", 3.0)])
    _write_summary(tmp_path, recipe, [row("pretrain", 5.0)])  # e.g. mm15 train --stage pretrain
    _write_summary(tmp_path, recipe, [row("sft", 4.0)])  # a rerun replaces its own row
    table = [line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| pretrain", "| sft"]  # recipe order
    assert "| sft | 2 | 4.000 |" in "\n".join(table)
    # A summary.json cut short (written in place before, so a kill could leave half of it) stopped the
    # next run after its stage had trained, with a JSON error naming no file.
    (tmp_path / "summary.json").write_text('[{"stage": "pretrain", "steps"')
    with pytest.warns(UserWarning, match=r"summary\.json cannot be read .*rewritten with this run's stages"):
        _write_summary(tmp_path, recipe, [row("sft", 6.0)])
    assert [r["stage"] for r in json.loads((tmp_path / "summary.json").read_text())] == ["sft"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.md"]  # no temporary left


def test_an_out_path_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mm15.cli import app

    (tmp_path / "recipe.yaml").write_text(ONE_STAGE)
    taken = tmp_path / "taken"
    taken.write_text("someone's notes\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(taken)])
    assert result.exit_code == 2, result.output
    assert f"run directory {taken} exists and is not a directory" in " ".join(result.output.split())
    assert taken.read_text() == "someone's notes\n"


def test_a_stage_directory_that_is_a_file_is_refused_before_training(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mm15.cli import app

    (tmp_path / "recipe.yaml").write_text(ONE_STAGE)
    run = tmp_path / "run"
    run.mkdir()
    taken = run / "pretrain"  # where the stage would write: a mkdir there raised FileExistsError unhandled
    taken.write_text("someone's notes\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert f"the directory of stage 'pretrain' {taken} exists and is not a directory" in " ".join(
        result.output.split()
    )
    assert taken.read_text() == "someone's notes\n"


def test_every_stage_is_checked_against_the_world_size_before_the_first_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later stage whose global batch does not split over the ranks stops the run at start-up, not
    after the stages before it have trained. The world size is faked: nothing may reach training."""
    from rich.console import Console

    from mm15.train import run
    from mm15.train.config import RecipeConfig
    from mm15.train.distributed import DistInfo

    data = yaml.safe_load(ONE_STAGE)
    data["stages"][0]["global_batch"] = 4  # 2 per rank: fits
    second = {**data["stages"][0], "name": "sft", "parent": "pretrain", "global_batch": 3, "micro_batch": 1}
    data["stages"].append(second)
    monkeypatch.setattr(run.D, "init_distributed", lambda: DistInfo(0, 2, 0, True))
    monkeypatch.setattr(run, "run_stage", lambda *args: pytest.fail("a stage started"))
    with pytest.raises(ValueError, match=r"stage 'sft': global_batch \(3\) must be a multiple of"):
        run.run_recipe(RecipeConfig.from_dict(data), Console(quiet=True), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_moved_data_folder_is_not_a_changed_setting() -> None:
    """Source paths are not compared on resume (the data's own fingerprints are); the rest are."""
    from mm15.train.config import RecipeConfig
    from mm15.train.run import resume_setting_changes, stage_settings

    data = yaml.safe_load(ONE_STAGE)
    data["stages"][0]["data"]["sources"]["text"] = "shards:/data/old"
    saved = stage_settings(RecipeConfig.from_dict(data).stages[0])
    data["stages"][0]["data"]["sources"]["text"] = "shards:/data/moved"
    assert resume_setting_changes(saved, RecipeConfig.from_dict(data).stages[0]) == []
    data["stages"][0]["max_steps"] = 9
    assert resume_setting_changes(saved, RecipeConfig.from_dict(data).stages[0]) == ["max_steps: 8 -> 9"]
    assert resume_setting_changes(None, RecipeConfig.from_dict(data).stages[0]) == []  # older checkpoints
    # Every prefetch mode hands out the same micro-batches: changing it is no reason to warn.
    saved = stage_settings(RecipeConfig.from_dict(data).stages[0])
    data["stages"][0]["data"]["prefetch"] = "inline"
    assert resume_setting_changes(saved, RecipeConfig.from_dict(data).stages[0]) == []


def test_a_resumed_stage_whose_settings_changed_says_which(tmp_path: Path) -> None:
    """Checkpoints record the stage's settings; a resume under other settings (here a longer run and
    another learning rate) names each change, and an unchanged one says nothing."""
    from typer.testing import CliRunner

    from mm15.cli import app
    from mm15.train.config import load_recipe

    recipe, run = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe.write_text(ONE_STAGE)
    first = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--max-steps", "4"])
    assert first.exit_code == 0, first.output
    shutil.rmtree(run / "pretrain" / "final")  # as if stopped after its last checkpoint
    # A --max-steps below the checkpoint's step trained nothing and closed the stage at step 4.
    short = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--max-steps", "3", "--resume"])
    assert short.exit_code == 2 and "past the stage's max_steps 3" in " ".join(short.output.split())
    assert not (run / "pretrain" / "final").exists()
    same = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--max-steps", "4", "--resume"])
    assert same.exit_code == 0 and "resumed from" in same.output and "has changed" not in same.output
    shutil.rmtree(run / "pretrain" / "final")
    recipe.write_text(ONE_STAGE.replace("lr: 1.0e-3", "lr: 2.0e-3"))
    longer = CliRunner().invoke(
        app, ["train", str(recipe), "--out", str(run), "--max-steps", "6", "--resume"]
    )
    flat = " ".join(longer.output.split())
    assert longer.exit_code == 0, longer.output
    assert (
        "stage 'pretrain' has changed since step-00000004: max_steps: 4 -> 6; optimizer.lr: 0.001 -> 0.002"
        in flat
    )
    assert "no longer repeats an uninterrupted run" in flat
    records = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    # ... and it does: the new peak on the new schedule's length (the checkpoint's optimizer state
    # once brought back the old peak, and the old schedule's floor for the first resumed step).
    schedule = load_recipe(recipe).stages[0].schedule
    compressed = schedule.compressed(8, 6)  # the 8-step stage cut to 6 by --max-steps
    assert [r["lr"] for r in records[4:]] == pytest.approx([2.0e-3 * compressed.factor(s, 6) for s in (4, 5)])
    assert records[5]["lr"] == pytest.approx(2.0e-3 * schedule.min_lr_ratio)  # the floor on the last step

    # Without --resume, a stage with an earlier run's checkpoints is not trained afresh over them.
    shutil.rmtree(run / "pretrain" / "final")
    before = sorted(p.name for p in (run / "pretrain" / "checkpoints").iterdir())
    again = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--max-steps", "6"])
    flat = " ".join(again.output.split())
    assert again.exit_code == 2, again.output
    assert "stage 'pretrain' has checkpoints of an earlier run" in flat and "add --resume" in flat, flat
    assert sorted(p.name for p in (run / "pretrain" / "checkpoints").iterdir()) == before

    # Another optimizer's state cannot continue: the resume is refused, naming both.
    recipe.write_text(ONE_STAGE.replace("{name: adamw, lr: 1.0e-3}", "{name: adafactor, lr: 1.0e-3}"))
    other = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--max-steps", "6", "--resume"])
    flat = " ".join(other.output.split())
    assert other.exit_code == 2, other.output
    assert "written with optimizer adamw, the recipe's stage 'pretrain' now uses adafactor" in flat, flat


def test_a_later_stages_missing_data_stops_the_run_before_the_first_stage_trains(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mm15.cli import app

    data = yaml.safe_load(ONE_STAGE)
    second = copy.deepcopy(data["stages"][0])
    second.update(name="sft", parent="pretrain")
    second["data"]["sources"]["caption"] = f"shards:{tmp_path / 'nowhere'}"
    data["stages"].append(second)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"stage 'sft', data source 'caption' (shards:{tmp_path / 'nowhere'}): " in flat, flat
    assert "no such shard or shard folder" in flat, flat
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    # And for a file an evaluation task reads: the recipe loads (only syntax is checked away from
    # the data), the run stops before training.
    from mm15.train.config import RecipeConfig

    second["data"]["sources"]["caption"] = "synth:caption"
    second.update(eval_every=2, eval_tasks=f"textvqa:path={tmp_path / 'val.json'}")
    RecipeConfig.from_dict(data)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")])
    flat = " ".join(result.output.split())
    assert result.exit_code == 2 and "task textvqa: option path=" in flat and "no such file" in flat, flat
    assert not (tmp_path / "run").exists()
    second.update(eval_every=0)
    # The same for a parent given as a model directory that holds no model.
    second["data"]["sources"]["caption"] = "synth:caption"
    second["parent"] = str(tmp_path / "elsewhere" / "final")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")])
    flat = " ".join(result.output.split())
    assert (
        result.exit_code == 2 and f"its parent '{second['parent']}' has no model (no config.json" in flat
    ), flat
    assert not (tmp_path / "run").exists()


def test_a_later_stage_without_its_parent_says_to_train_the_parent_first(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mm15.cli import app

    second = (
        ONE_STAGE.split("stages:\n", 1)[1]
        .replace("name: pretrain", "name: sft")
        .replace("parent: init", "parent: pretrain")
    )
    (tmp_path / "recipe.yaml").write_text(ONE_STAGE + second)
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"), "--stage", "sft"]
    )
    flat = " ".join(result.output.split())
    assert result.exit_code == 2, result.output  # a start-up check, before any stage runs
    assert "stage 'sft': its parent 'pretrain' has no model at" in flat, flat
    assert "train it first (--stage pretrain) or run the recipe without --stage" in flat, flat


@pytest.mark.parametrize("prefetch", ["process", "inline"])
def test_a_malformed_shard_record_stops_the_run_with_the_readers_error(tmp_path: Path, prefetch: str) -> None:
    """Shards are read strictly: a record that is not JSON stops ``mm15 train`` with the reader's
    message (file, member, reason) and exit code 2, the same whether the data worker process or the
    training process read it."""
    import io
    import tarfile

    from mm15.data.sources import write_shards
    from mm15.data.synth import generate

    shards = tmp_path / "shards"
    write_shards([generate("general-color", i) for i in range(3)], shards, samples_per_shard=3)
    with tarfile.open(shards / "shard-000001.tar", "w") as tar:
        info = tarfile.TarInfo("broken.json")
        info.size = len(b"{oops")
        tar.addfile(info, io.BytesIO(b"{oops"))
    recipe = (
        ONE_STAGE.replace("name: killtest", "name: badshard")
        .replace("mixture: {caption: 1, text: 1}", "mixture: {shards: 1}")
        .replace('sources: {text: "synth:text-only"}', f'sources: {{shards: "shards:{shards}"}}')
        .replace("seq_length: 1024", f"seq_length: 1024\n      prefetch: {prefetch}")
    )
    (tmp_path / "recipe.yaml").write_text(recipe)
    process = mm15("train", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"), "--max-steps", "4")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 2, output
    message = " ".join(output.split())  # the console wraps long lines
    assert "error:" in message and "shard-000001.tar" in message and "bad_json" in message, output
    assert "TypeError" not in output and "Traceback" not in output


def test_skipped_samples_are_named_at_the_end_of_the_stage(tmp_path: Path) -> None:
    """Samples whose images do not decode are counted and, the first few, named (source and id) in the
    closing lines and in summary.md, so they can be found in the data; the worker process passes them on."""
    from typer.testing import CliRunner

    from mm15.cli import app
    from mm15.data.sources import write_shards
    from mm15.data.synth import generate

    samples = [generate("general-color", i) for i in range(6)]
    samples[1].images = [b"\x89PNG\r\n\x1a\n not the rest of a PNG"]
    shards = tmp_path / "shards"
    write_shards(samples, shards, samples_per_shard=6)
    recipe = (
        ONE_STAGE.replace("mixture: {caption: 1, text: 1}", "mixture: {shards: 1}")
        .replace('sources: {text: "synth:text-only"}', f'sources: {{shards: "shards:{shards}"}}')
        .replace("seq_length: 1024", "seq_length: 1024\n      prefetch: process\n      shuffle_buffer: 0")
        .replace("    keep_last: 2", "    keep_last: 2\n    max_corrupt_fraction: 0.5")
    )
    (tmp_path / "recipe.yaml").write_text(recipe)
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "recipe.yaml"), "--out", str(run), "--max-steps", "2"]
    )
    flat = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    named = f"corrupt: source 'shards', sample '{samples[1].id}'"
    assert "skipped (counted): {'corrupt': 1}" in flat and named in flat, flat
    summary = (run / "summary.md").read_text()
    assert "Skipped samples" in summary and f"- pretrain: {named}" in summary, summary


def test_check_runs_the_start_up_checks_and_says_what_each_stage_would_do(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mm15.cli import app

    recipe, run = tmp_path / "recipe.yaml", tmp_path / "run [b]"  # "[b]" is Rich markup (bold) unless escaped
    recipe.write_text(ONE_STAGE)
    base = ["train", str(recipe), "--out", str(run), "--max-steps", "4"]

    def check(*extra: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*base, "--check", *extra])
        return result.exit_code, " ".join(result.output.split())

    code, text = check()
    assert code == 0 and "pretrain: train from step 0" in text, text
    assert (
        "4 steps; batch 2 = 2 x 1 x 1" in text
        and "data: caption: synth:caption, text: synth:text-only" in text
    )
    assert not run.exists()  # nothing written
    assert CliRunner().invoke(app, base).exit_code == 0
    code, text = check()
    assert code == 0 and "pretrain: done already" in text, text
    again = CliRunner().invoke(app, base)
    flat = "".join(again.output.split())  # the console wraps long lines
    assert again.exit_code == 0 and "".join(f"done already ({run / 'pretrain' / 'final'})".split()) in flat
    shutil.rmtree(run / "pretrain" / "final")  # stopped after its last checkpoint
    code, text = check("--resume")
    assert code == 0 and "pretrain: resume at step 4" in text, text
    code, text = check()  # without --resume: the refusal a real run would give
    assert code == 2 and "has checkpoints of an earlier run" in text, text


def test_a_full_disk_reported_by_safetensors_stops_the_stage_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # safetensors reports ENOSPC as its own SafetensorError, which is not an OSError: a traceback.
    from safetensors import SafetensorError

    from mm15.train import run
    from mm15.train.config import RecipeConfig

    def full_disk(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run, "save_checkpoint", full_disk)
    stage = RecipeConfig.from_dict(yaml.safe_load(ONE_STAGE)).stages[0]
    with pytest.raises(run.StageFailed, match=r"cannot write the checkpoint of step 2 .*No space left"):
        run._save_or_stop(tmp_path, 2, stage, None, None, None, {})  # type: ignore[arg-type]


def test_check_refuses_a_source_without_a_sample(tmp_path: Path) -> None:
    """An empty shard folder or video annotation file passed --check and stopped its stage at step 0."""
    import tarfile

    from typer.testing import CliRunner

    from mm15.cli import app

    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / "shard-000000.tar", "w"):
        pass
    (tmp_path / "none.json").write_text("[]")
    for spec, message in (
        (f"shards:{empty}", "no samples"),
        (f"video:{tmp_path / 'none.json'}", "no video-QA records"),
    ):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(ONE_STAGE.replace('"synth:text-only"', f'"{spec}"'))
        result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run"), "--check"])
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "data source 'text'" in text and message in text, text


def test_check_refuses_a_stage_whose_parent_stage_is_not_trained(tmp_path: Path) -> None:
    # --check passed and the real run stopped at the stage with exit 3.
    from typer.testing import CliRunner

    from mm15.cli import app

    recipe = str(ROOT / "recipes" / "tiny.yaml")
    args = ["train", recipe, "--stage", "sft", "--out", str(tmp_path / "run"), "--check"]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "stage 'sft': its parent 'ocr' has no model at" in text, text
    assert "--stage ocr" in text


def test_stop_signals_ask_once_then_interrupt_and_restore_the_handlers() -> None:
    from rich.console import Console

    from mm15.train.run import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    # Python's own SIGINT handler, whatever the suite was started under: a shell's background job
    # starts with SIGINT ignored, and StopSignals rightly leaves an ignored signal alone.
    outer_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        console = Console(record=True, width=200)
        with StopSignals(console) as stop:
            assert stop.agreed() is None
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
            assert stop.agreed() == signal.SIGTERM
            assert "SIGTERM: stopping after this step, with a checkpoint" in console.export_text()
            with pytest.raises(KeyboardInterrupt):  # a second signal does not wait for the step
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # not reached: the handler raises first
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer_int)


def test_stop_signals_leave_an_ignored_signal_ignored() -> None:
    from rich.console import Console

    from mm15.train.run import StopSignals

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
    try:
        with StopSignals(Console(quiet=True)) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert stop.agreed() is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "mm15 train r.yaml --out 'runs/a b' --resume"),
        ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc_per_node 2 -m mm15.cli train"),
        ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc_per_node 2 --nnodes 2 (and your"),
    ],
)
def test_the_resume_command_is_the_runs_own_launcher(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    # Under torchrun the printed command was "mm15 train ... --resume": one process, which restarts the
    # per-rank data streams, so the losses no longer repeated the run's.
    from mm15.cli import _resume_command

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["mm15", "train", "r.yaml", "--out", "runs/a b", "--no-resume"])
    command = _resume_command()
    assert command.startswith(expected) and command.endswith("train r.yaml --out 'runs/a b' --resume")


# lr 1e30: step 0 trains, and every later step's gradient norm is NaN (its loss stays finite).
NAN_STAGE = """
name: nanskip
model: {preset: tiny}
seed: 0
stages:
  - name: s1
    parent: init
    trainable: [llm]
    optimizer: {name: adamw, lr: 1.0e+30, weight_decay: 0.0}
    autocast: fp32
    nan_policy: skip
    global_batch: 2
    micro_batch: 2
    max_steps: 4
    save_every: 2
    data:
      seq_length: 512
      prefetch: inline
      mixture: {text: 1}
      sources: {text: "synth:text-only"}
"""


def _strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def skipped_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage with skipped non-finite steps, interrupted after its step-2 checkpoint and resumed."""
    from typer.testing import CliRunner

    from mm15.cli import app

    tmp = tmp_path_factory.mktemp("nanskip")
    recipe, run = tmp / "recipe.yaml", tmp / "run"
    recipe.write_text(NAN_STAGE)
    first = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run)])
    assert first.exit_code == 0, first.output
    # As if killed after the checkpoint of step 2: steps 2 and 3 are trained again on --resume.
    shutil.rmtree(run / "s1" / "final")
    shutil.rmtree(run / "s1" / "checkpoints" / "step-00000004")
    resumed = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), "--resume"])
    assert resumed.exit_code == 0 and "at step 2" in " ".join(resumed.output.split()), resumed.output
    return run


def test_a_resumed_stage_counts_the_steps_skipped_before_the_interruption(skipped_and_resumed: Path) -> None:
    # The count started at 0 in every process: the summary said 2 (steps 2, 3) where 3 were skipped.
    run = skipped_and_resumed
    records = [_strict_json(line) for line in (run / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True, True]
    (row,) = json.loads((run / "summary.json").read_text())
    assert row["skipped"] == {"nonfinite_steps": 3}
    assert "{'nonfinite_steps': 3}" in (run / "summary.md").read_text()


def test_metrics_jsonl_is_strict_json_and_a_skipped_step_keeps_its_loss(skipped_and_resumed: Path) -> None:
    """A skipped step was written as ``"loss": NaN`` (not JSON) although only its gradient norm was
    not finite: its measured loss goes in, and a value that really is not finite is ``null``."""
    from mm15.train.run import json_line

    run = skipped_and_resumed
    lines = (run / "s1" / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]  # the lines from the checkpoint and the new ones
    for record in records:
        assert record["loss"] == pytest.approx(record["source_loss"]["text"], rel=1e-6), record
    board = EventAccumulator(str(run / "s1" / "tensorboard"))
    board.Reload()
    assert [e.value for e in board.Scalars("s1/loss")] == pytest.approx(
        [r["loss"] for r in records], rel=1e-6
    )
    assert [e.value for e in board.Scalars("s1/skipped")] == [0.0, 1.0, 1.0, 1.0]
    nan = float("nan")
    assert json_line({"loss": nan, "source_loss": {"a": float("inf")}, "x": [nan]}) == (
        '{"loss": null, "source_loss": {"a": null}, "x": [null]}\n'
    )


def test_a_non_finite_step_before_any_checkpoint_says_there_is_none_yet(tmp_path: Path) -> None:
    # It said "the last good checkpoint is None".
    from typer.testing import CliRunner

    from mm15.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(NAN_STAGE.replace("nan_policy: skip", "nan_policy: error").replace("save_every: 2", ""))
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    flat = " ".join(result.output.split())
    assert result.exit_code == 3, result.output
    assert "step 1: the gradient norm is nan; stopped before the update" in flat, flat
    assert "there is no checkpoint of this stage yet, so a rerun (with or without --resume) trains it" in flat
    assert "None" not in flat


def test_the_loss_plot_shows_a_stage_of_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A line through one point draws nothing: a 1-step stage's plot was empty, and so was the curve of
    a source present at one step only."""
    import matplotlib.pyplot as plt

    from mm15.train.run import _plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    history = [
        {"step": 0, "loss": 2.0, "source_loss": {"a": 2.0, "b": 1.0}},
        {"step": 1, "loss": None, "source_loss": {"a": None}},  # a step whose loss was not finite
    ]
    for records in (history[:1], history):
        _plot(records, tmp_path / "loss.png", "one step")
        (figure,) = figures
        lines = figure.axes[0].get_lines()
        assert len(lines) == 3
        for line in lines:
            shown = [y for y in line.get_ydata() if y == y]  # the finite points
            assert len(shown) >= 2 or line.get_marker() not in (None, "None", "", " "), line.get_label()
        figures.clear()
    plt.close("all")


def test_max_steps_cuts_only_the_stages_longer_than_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-steps 5 rewrote a 3-step stage's schedule (its total_steps 6 gone, warm-up clamped)."""
    from typer.testing import CliRunner

    import mm15.train.run as run_module
    from mm15.cli import app
    from mm15.train.config import load_recipe

    data = yaml.safe_load(ONE_STAGE)
    data["stages"][0].update(max_steps=3, save_every=100, schedule={"warmup_steps": 2, "total_steps": 6})
    second = {**data["stages"][0], "name": "sft", "parent": "pretrain", "max_steps": 10}
    second["schedule"] = {"warmup_steps": 4, "total_steps": 12}
    data["stages"].append(second)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    written = load_recipe(recipe)
    trained = []
    monkeypatch.setattr(
        run_module, "run_recipe", lambda config, *args, **kwargs: trained.append(config) or []
    )
    for cap in ("3", "5", "10"):  # no stage is longer than 10, only sft than 3 and 5
        result = CliRunner().invoke(
            app, ["train", str(recipe), "--out", str(tmp_path / "run"), "--max-steps", cap]
        )
        assert result.exit_code == 0, result.output
    assert trained[0].stages[0] == written.stages[0]
    short = trained[0].stages[1]
    assert (short.max_steps, short.save_every) == (3, 3)
    # Compressed: warm-up 4 of 10 steps keeps its share of 3 (1), the floor on the last step (2).
    assert (short.schedule.warmup_steps, short.schedule.total_steps) == (1, 2)
    assert trained[1].stages == (written.stages[0], trained[1].stages[1])
    assert trained[1].stages[1].max_steps == 5
    assert (trained[1].stages[1].schedule.warmup_steps, trained[1].stages[1].schedule.total_steps) == (2, 4)
    assert trained[2] == written
    zero = CliRunner().invoke(app, ["train", str(recipe), "--max-steps", "0"])
    assert zero.exit_code == 2 and "--max-steps" in zero.output and len(trained) == 3, zero.output


def test_a_later_stage_of_the_run_does_not_keep_the_earlier_stages_speed_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second stage reuses the first one's model: grad_checkpointing and compile, true in the first
    and false in the second, stayed on (they could only be switched on). ``compile`` is faked (no
    inductor): the block's call goes through ``_compiled_call_impl``, as ``Module.compile`` sets it."""
    import torch
    from rich.console import Console

    import mm15.train.run as run_module
    from mm15.train.config import RecipeConfig

    def fake_compile(module: torch.nn.Module, *args: object, **kwargs: object) -> None:
        module._compiled_call_impl = module._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    seen: list[tuple[bool, bool, bool]] = []
    real_step = run_module.train_step

    def spy(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        inner = run_module.D.unwrap(model)
        blocks = [*inner.llm.get_decoder().layers, *run_module.D.vision_blocks(inner)]
        compiled = {getattr(b, "_compiled_call_impl", None) is not None for b in blocks}
        assert len(compiled) == 1  # all blocks or none
        seen.append(
            (inner.llm.is_activation_checkpointing, inner.vision.model.is_activation_checkpointing, *compiled)
        )
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(run_module, "train_step", spy)
    data = yaml.safe_load(ONE_STAGE)
    first = data["stages"][0]
    first.update(max_steps=1, schedule={"warmup_steps": 0}, grad_checkpointing=True, compile=True)
    data["stages"].append({**first, "name": "sft", "parent": "pretrain", "grad_checkpointing": False})
    data["stages"][1]["compile"] = False
    run_module.run_recipe(RecipeConfig.from_dict(data), Console(quiet=True), out=tmp_path / "run")
    assert seen == [(True, True, True), (False, False, False)]


def test_a_stage_starts_from_its_parent_and_its_own_random_state(tmp_path: Path) -> None:
    """Two stages branching from one parent: the second branch trained on top of the first (the model
    left in memory was reused for any parent of the recipe), and a stage started after --resume or
    --stage continued another random state than in the whole run (MoE router jitter draws from it)."""
    from rich.console import Console

    from mm15.train.config import RecipeConfig
    from mm15.train.run import run_recipe

    data = yaml.safe_load(ONE_STAGE)
    data["model"] = {"preset": "tiny", "overrides": {"moe": {"num_experts": 4, "router_jitter": 0.5}}}
    base = data["stages"][0]
    base.update(max_steps=2, save_every=2, trainable=["encoder", "connector", "llm", "routers"])
    base["data"].update(seq_length=512, prefetch="inline")
    branch_a = {**base, "name": "a", "parent": "pretrain", "optimizer": {"name": "adamw", "lr": 5.0e-2}}
    branch_b = {**base, "name": "b", "parent": "pretrain", "max_steps": 3, "save_every": 3}
    data["stages"] += [branch_a, branch_b]
    recipe = RecipeConfig.from_dict(data)
    whole, alone = tmp_path / "whole", tmp_path / "alone"
    run_recipe(recipe, Console(quiet=True), out=whole)
    alone.mkdir()
    shutil.copytree(whole / "pretrain", alone / "pretrain")
    run_recipe(recipe, Console(quiet=True), stage_name="b", out=alone)

    def losses_of(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "b" / "metrics.jsonl").read_text().splitlines()]

    assert len(losses_of(whole)) == 3
    assert losses_of(whole) == losses_of(alone)


def test_a_parent_directory_keeps_its_own_tile_size(tmp_path: Path) -> None:
    """A stage starting from a model directory took the recipe preset's image plan: a model whose
    encoder takes 32-pixel tiles got the tiny preset's 64-pixel ones and the stage stopped at its first
    batch (as `--parent` with a smol model and recipes/ui.yaml did)."""
    import dataclasses

    from rich.console import Console

    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset
    from mm15.train.config import RecipeConfig
    from mm15.train.run import run_recipe

    tiny = preset("tiny")
    small_tiles = dataclasses.replace(
        tiny,
        vision=dataclasses.replace(tiny.vision, image_size=32),
        connector=dataclasses.replace(tiny.connector, num_patches=16),
        image=dataclasses.replace(tiny.image, tile_size=32),
    )
    MM15Model.build(small_tiles).save_pretrained(tmp_path / "parent")
    data = yaml.safe_load(ONE_STAGE)
    stage = data["stages"][0]
    stage.update(parent=str(tmp_path / "parent"), max_steps=2, save_every=2)
    stage["data"].update(prefetch="inline", mixture={"caption": 1}, sources={})
    stage["image"] = {"split": True, "n_max": 4}  # the stage's own settings still apply over the model's
    run_recipe(RecipeConfig.from_dict(data), Console(quiet=True), out=tmp_path / "run")
    trained = MM15Model.from_pretrained(tmp_path / "run" / "pretrain" / "final")
    assert (trained.cfg.image.tile_size, trained.cfg.image.split, trained.cfg.image.n_max) == (32, True, 4)


def test_export_and_log_failures_finished_stages_and_changed_trainables_say_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the export was a raw SafetensorError traceback and one writing metrics.jsonl an
    error naming nothing; a finished stage was skipped silently under a changed recipe; a changed
    trainable list was reported as mismatched parameter-group counts; a killed export's staging folder
    (31 MB) stayed for ever."""
    from safetensors import SafetensorError
    from typer.testing import CliRunner

    from mm15.cli import app
    from mm15.train import run as run_module

    recipe, run = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe.write_text(ONE_STAGE)

    def train(*extra: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(run), *extra])
        return result.exit_code, " ".join(result.output.split())

    def full_disk(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "export_final", full_disk)
        code, text = train("--max-steps", "2")
    assert code == 3, text
    assert (
        "cannot export the final model to" in text
        and "step-00000002; fix that and continue with --resume" in text
    )
    with monkeypatch.context() as patch:
        patch.setattr(run_module.StageLog, "step", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
        code, text = train("--max-steps", "4", "--resume")
    assert code == 3 and "cannot write the logs of step 3 ([Errno 28] No space)" in text, text

    recipe.write_text(ONE_STAGE.replace("trainable: [encoder, connector, llm]", "trainable: [llm]"))
    code, text = train("--max-steps", "2", "--resume")
    assert code == 2, text
    assert "was trained with trainable: ['encoder', 'connector', 'llm'], the recipe now says ['llm']" in text

    recipe.write_text(ONE_STAGE)
    (run / "pretrain" / ".final.tmp-killed").mkdir()
    code, text = train("--max-steps", "2", "--resume")
    assert code == 0, text
    assert not list((run / "pretrain").glob(".final.tmp-*"))
    assert json.loads((run / "pretrain" / "final" / "mm15_stage.json").read_text())["max_steps"] == 2
    code, text = train()  # the whole recipe into the directory of a quick --max-steps run
    assert code == 0 and "pretrain: done already" in text, text
    assert "finished with other settings than the recipe's now: max_steps: 2 -> 8" in text, text


def test_the_summary_is_written_after_each_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was written when the run ended: a SIGKILL in a later stage lost the finished stages' rows."""
    from rich.console import Console

    from mm15.train import run as run_module
    from mm15.train.config import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    seen: list[list[str]] = []

    def fake_stage(recipe, stage, run_dir, *args):  # type: ignore[no-untyped-def]
        record = run_dir / "summary.json"
        seen.append([r["stage"] for r in json.loads(record.read_text())] if record.exists() else [])
        row = {"stage": stage.name, "steps": 1, "first_loss": 1.0, "last_loss": 1.0}
        return row | {"tokens_per_s": 1.0, "data_wait": 0.0, "skipped": {}}

    monkeypatch.setattr(run_module, "run_stage", fake_stage)
    monkeypatch.setattr(run_module, "_model_for", lambda *args: None)
    monkeypatch.setattr(run_module, "_check_before_training", lambda *args: None)
    run_module.run_recipe(recipe, Console(quiet=True), out=tmp_path / "run")
    assert seen == [[], ["pretrain"], ["pretrain", "ocr"]]
