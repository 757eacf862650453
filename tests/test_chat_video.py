"""mm15 chat --video: a clip's sampled frames, unsplit, give the answer generate() gives on them."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import build_test_model, scripted_answer
from typer.testing import CliRunner

import mm15.serve.terminal as terminal
from mm15.cli import app
from mm15.eval.runner import generate_texts
from mm15.model.generate import GenerationConfig
from mm15.model.mm15 import MM15Model, MM15Processor
from mm15.serve.conversation import render_prompt, video_turn
from mm15.serve.engine import encode_prompt
from mm15.video import read_video, write_video

runner = CliRunner()
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40), (200, 40, 200), (40, 200, 200)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("chat-video") / "model")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six solid-colour 64x48 frames: frame k has colour k, so the sampled frames can be told apart."""
    frames = [Image.new("RGB", (64, 48), colour) for colour in COLOURS]
    return write_video(tmp_path_factory.mktemp("videos") / "clip.mp4", frames, fps=6)


def test_frames_are_written_as_in_training_and_never_split(model_dir: Path, clip: Path) -> None:
    model = MM15Model.from_pretrained(model_dir)
    frames = read_video(clip, 2).frames
    turn = video_turn("what moves?", frames)
    assert turn.text == "<image><image>\nwhat moves?" and turn.video
    prompt, images = render_prompt(model.tokenizer, [turn])
    processor = MM15Processor.for_model(model)
    split = encode_prompt(processor, model.image_token_id, prompt, images)
    unsplit = encode_prompt(processor, model.image_token_id, prompt, images, video=True)
    # Two images alone would be split (the tiny preset's plan); two frames are one tile each.
    assert split.pixel_values is not None and split.pixel_values.shape[0] > 2
    assert unsplit.pixel_values is not None and unsplit.pixel_values.shape[0] == 2


def test_one_shot_video_equals_generate_on_its_frames(model_dir: Path, clip: Path, tmp_path: Path) -> None:
    args = ["chat", "--model", str(model_dir), "--video", str(clip), "--frames", "2"]
    result = runner.invoke(app, [*args, "--max-tokens", "6", "--out", str(tmp_path), "what moves?"])
    assert result.exit_code == 0, result.output
    model = MM15Model.from_pretrained(model_dir)
    prompt, frames = render_prompt(model.tokenizer, [video_turn("what moves?", read_video(clip, 2).frames)])
    # The evaluation runner's video path: the same frames, planned unsplit, generated with generate().
    expected = generate_texts(model, [prompt], [frames], GenerationConfig(max_new_tokens=6), video=True)[0]
    assert result.stdout == expected + "\n"


def test_interactive_video_and_errors(
    model_dir: Path, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MM15Model.from_pretrained(model_dir)
    monkeypatch.setattr(terminal.MM15Model, "from_pretrained", lambda path: model)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    script = "\n".join(
        [
            f"/video {corrupt}",
            f"/video {clip}",
            "what moves?",
            f"/video {clip}",  # a second video in the same conversation is refused
            "/reset",
            "/video",
            "/quit",
        ]
    )
    with scripted_answer(model, "red [0, 0, 9, 9]"):
        result = runner.invoke(
            app,
            [
                "chat",
                "--model",
                str(model_dir),
                "--frames",
                "3",
                "--out",
                str(tmp_path),
                "--max-tokens",
                "20",
            ],
            input=script,
        )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "error: cannot use video" in out and "corrupt.mp4" in out
    assert f"[attached {clip} (3 frames) to the next question]" in out
    assert out.count("red [0, 0, 9, 9]") == 1
    assert "a conversation holds one video" in out
    assert "usage: /video PATH" in out
    assert not list(tmp_path.glob("answer_*.png"))  # a video's answer is not drawn on a frame


def test_one_shot_video_errors_exit_2(model_dir: Path, clip: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all" * 20)
    for path, reason in (
        (empty, "empty file"),
        (corrupt, "not a readable video"),
        (tmp_path / "x.mp4", "no such"),
    ):
        result = runner.invoke(app, ["chat", "--model", str(model_dir), "--video", str(path), "hi"])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: cannot use video") and reason in result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
    both = runner.invoke(
        app, ["chat", "--model", str(model_dir), "--video", str(clip), "--image", str(clip), "hi"]
    )
    assert both.exit_code == 2 and "either --image or --video" in both.stderr
