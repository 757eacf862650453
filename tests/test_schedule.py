"""The learning-rate schedule: warm-up and cosine factors, compressed by ``mm15 train --max-steps``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from mm15.train.config import RecipeConfig, ScheduleConfig


def cosine(progress: float, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def factors(schedule: ScheduleConfig, steps: int) -> list[float]:
    return [schedule.factor(step, steps) for step in range(steps)]


def test_uncut_schedules_keep_their_factors() -> None:
    """The factors of a stage as the recipe has it (what the resume tests' exact losses rest on)."""
    assert factors(ScheduleConfig(warmup_steps=2), 6) == [
        0.5,
        1.0,
        1.0,
        cosine(1 / 4),
        cosine(2 / 4),
        cosine(3 / 4),
    ]
    # The last step of an uncut stage is just above the floor; the floor is reached at max_steps.
    assert ScheduleConfig(warmup_steps=4).factor(4, 5) == 1.0
    assert ScheduleConfig(warmup_steps=4).factor(5, 5) == 0.1
    # An explicit total_steps: the floor from there on.
    explicit = ScheduleConfig(warmup_steps=1, min_lr_ratio=0.2, total_steps=3)
    assert factors(explicit, 6) == [1.0, 1.0, cosine(1 / 2, 0.2), 0.2, 0.2, 0.2]


@pytest.mark.parametrize(
    ("warmup", "stage_steps", "steps", "expected_warmup", "expected"),
    [
        # A 4-step warm-up in a 5-step cut ended at the peak ([.25, .5, .75, 1, 1]); 5 x 5 / 6 rounds to 4.
        (5, 6, 5, 4, [0.25, 0.5, 0.75, 1.0, 0.1]),
        # 4 x 5 / 8 = 2.5 rounds half up to 3; the cosine runs from step 3 to its floor on step 4.
        (4, 8, 5, 3, [1 / 3, 2 / 3, 1.0, 1.0, 0.1]),
        # The tiny recipe's SFT stage (2,000 steps, warm-up 20) cut to 5: 20 x 5 / 2000 rounds to 0.
        (20, 2000, 5, 0, [1.0, cosine(1 / 4), cosine(2 / 4), cosine(3 / 4), 0.1]),
        # 10 x 5 / 60 = 0.83 rounds to 1.
        (10, 60, 5, 1, [1.0, 1.0, cosine(1 / 3), cosine(2 / 3), 0.1]),
        # A warm-up longer than the cut is capped at steps - 1.
        (8, 8, 5, 4, [0.25, 0.5, 0.75, 1.0, 0.1]),
        # One step: it is the last, so it runs at the floor.
        (4, 8, 1, 0, [0.1]),
    ],
)
def test_a_cut_schedule_is_compressed_and_ends_at_the_floor(
    warmup: int, stage_steps: int, steps: int, expected_warmup: int, expected: list[float]
) -> None:
    cut = ScheduleConfig(warmup_steps=warmup, min_lr_ratio=0.1, total_steps=stage_steps + 3).compressed(
        stage_steps, steps
    )
    assert (cut.warmup_steps, cut.total_steps, cut.min_lr_ratio) == (expected_warmup, steps - 1, 0.1)
    assert factors(cut, steps) == expected
    assert cut.factor(steps - 1, steps) == 0.1


def test_compressed_refuses_what_is_no_cut() -> None:
    for stage_steps, steps in ((5, 5), (5, 6), (5, 0)):
        with pytest.raises(ValueError, match="a cut needs 1 <= steps < stage_steps"):
            ScheduleConfig(warmup_steps=1).compressed(stage_steps, steps)


RECIPE: dict[str, Any] = {
    "name": "cut",
    "model": {"preset": "tiny"},
    "stages": [
        {
            "name": "long",
            "schedule": {"warmup_steps": 4, "min_lr_ratio": 0.1, "total_steps": 12},
            "global_batch": 2,
            "micro_batch": 2,
            "max_steps": 8,
            "data": {"seq_length": 1024, "mixture": {"text-only": 1}},
        },
        {
            "name": "short",
            "schedule": {"warmup_steps": 2, "min_lr_ratio": 0.1},
            "global_batch": 2,
            "micro_batch": 2,
            "max_steps": 5,
            "data": {"seq_length": 1024, "mixture": {"text-only": 1}},
        },
    ],
}


def test_max_steps_compresses_the_schedule_of_every_cut_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mm15 train --max-steps 5``: the 8-step stage's schedule ends at its floor on step 5 (it ended at
    the peak), and the 5-step stage runs exactly as written."""
    from typer.testing import CliRunner

    import mm15.train.run as run_module
    from mm15.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    trained: list[RecipeConfig] = []
    monkeypatch.setattr(
        run_module, "run_recipe", lambda config, *args, **kwargs: trained.append(config) or []
    )
    result = CliRunner().invoke(
        app, ["train", str(recipe), "--out", str(tmp_path / "run"), "--max-steps", "5"]
    )
    assert result.exit_code == 0, result.output
    (config,) = trained
    long, short = config.stages
    assert (long.max_steps, long.schedule.warmup_steps, long.schedule.total_steps) == (5, 3, 4)
    assert factors(long.schedule, long.max_steps) == [1 / 3, 2 / 3, 1.0, 1.0, 0.1]
    assert short == RecipeConfig.from_dict(RECIPE).stages[1]
    assert factors(short.schedule, 5) == [0.5, 1.0, 1.0, cosine(1 / 3), cosine(2 / 3)]
