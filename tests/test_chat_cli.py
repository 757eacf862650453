"""mm15 chat: one-shot and interactive, streamed answers equal generate(), boxes drawn, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import build_test_model, png_bytes, scripted_answer
from typer.testing import CliRunner

import mm15.serve.terminal as terminal
from mm15.cli import app
from mm15.hardware import autocast
from mm15.image import load_image
from mm15.model.generate import GenerationConfig, generate
from mm15.model.mm15 import MM15Model, MM15Processor
from mm15.serve.conversation import question_turn, render_prompt

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "green.png"
    path.write_bytes(png_bytes(160, 120, (40, 160, 60)))
    return path


def greedy(model_dir: Path, question: str, images: list[Path], max_new_tokens: int) -> str:
    model = MM15Model.from_pretrained(model_dir)
    prompt, pictures = render_prompt(
        model.tokenizer, [question_turn(question, [load_image(p) for p in images])]
    )
    with autocast():
        batch = MM15Processor.for_model(model)([prompt], [pictures])
        return generate(model, batch, GenerationConfig(max_new_tokens=max_new_tokens))[0]


def test_one_shot_prints_the_greedy_answer(model_dir: Path, picture: Path, tmp_path: Path) -> None:
    for images in ([], [picture]):
        args = [
            "chat",
            "--model",
            str(model_dir),
            "--max-tokens",
            "8",
            "--out",
            str(tmp_path),
            "what is this?",
        ]
        for image in images:
            args[1:1] = ["--image", str(image)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.stdout == greedy(model_dir, "what is this?", images, 8) + "\n"


def test_the_answer_streams_piece_by_piece(model_dir: Path, tmp_path: Path) -> None:
    model = MM15Model.from_pretrained(model_dir)
    pieces: list[str] = []
    session = terminal.ChatSession(model, GenerationConfig(max_new_tokens=30), tmp_path, write=pieces.append)
    with scripted_answer(model, "a small green square"):
        answer, drawing = session.ask("what is it?")
    assert answer == "a small green square" and drawing is None
    assert len(pieces) > 5 and "".join(pieces) == answer + "\n"


@pytest.mark.parametrize(
    ("answer", "shown"),
    [("", "[the model's answer has no text]"), ("   ", "   [the model answered only spaces]")],
)
def test_an_answer_without_text_says_so(model_dir: Path, tmp_path: Path, answer: str, shown: str) -> None:
    """An untrained model often ends its turn at once: a bare blank line would look like a hang."""
    model = MM15Model.from_pretrained(model_dir)
    pieces: list[str] = []
    session = terminal.ChatSession(model, GenerationConfig(max_new_tokens=30), tmp_path, write=pieces.append)
    with scripted_answer(model, answer):
        said, _ = session.ask("what is it?")
    assert said == answer and "".join(pieces) == shown + "\n"
    assert session.turns[-1].text == answer  # the conversation keeps what the model said


def test_an_answer_that_writes_an_image_placeholder_does_not_end_the_chat(
    model_dir: Path, tmp_path: Path
) -> None:
    """The placeholder in the model's own answer once made the stored turn claim an image it did not
    have, and the chat ended with a traceback; the conversation now keeps the text, defused."""
    model = MM15Model.from_pretrained(model_dir)
    pieces: list[str] = []
    session = terminal.ChatSession(model, GenerationConfig(max_new_tokens=30), tmp_path, write=pieces.append)
    with scripted_answer(model, "see <image> here"):
        said, _ = session.ask("describe")
        again, _ = session.ask("and again?")  # the next prompt renders the earlier answer
    assert said == again == "see <image> here" and "".join(pieces).count("see <image> here") == 2
    assert [turn.images for turn in session.turns] == [[], [], [], []]
    assert session.turns[1].text == "see <\u200bimage> here"


def test_a_box_in_the_answer_is_drawn(
    model_dir: Path, picture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MM15Model.from_pretrained(model_dir)
    monkeypatch.setattr(terminal.MM15Model, "from_pretrained", lambda path: model)
    out = tmp_path / "drawn"
    with scripted_answer(model, "the square is at [250, 250, 750, 750] and its centre [500, 500]"):
        result = runner.invoke(
            app, ["chat", "--model", str(model_dir), "--image", str(picture), "--out", str(out), "where?"]
        )
    assert result.exit_code == 0, result.output
    assert "[250, 250, 750, 750]" in result.stdout
    path = out / "answer_001.png"
    assert f"drew 1 box(es) and 1 point(s): {path}" in result.stdout
    drawn = Image.open(path).convert("RGB")
    assert drawn.size == (160, 120)
    # The box's left edge: x = (250 + 0.5) * 160 / 1000 = 40.08, halfway down the image.
    assert drawn.getpixel((40, 60)) == terminal.BOX_COLOR
    assert drawn.getpixel((5, 5)) == (40, 160, 60)  # outside the box: the image is untouched


def test_interactive_with_piped_input(
    model_dir: Path, picture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MM15Model.from_pretrained(model_dir)
    monkeypatch.setattr(terminal.MM15Model, "from_pretrained", lambda path: model)
    script = "\n".join(
        [
            f"/image {picture}",
            "what is it?",
            "and now?",
            "/image /no/such/file.png",
            "/bogus",
            f"/images {picture}",  # not /image: an unknown command, nothing attached
            "/reset",
            "say <image> please",
            "hello",
            "/quit",
            "never read",
        ]
    )
    with scripted_answer(model, "a box [0, 0, 999, 999]"):
        result = runner.invoke(
            app,
            ["chat", "--model", str(model_dir), "--out", str(tmp_path), "--max-tokens", "30"],
            input=script,
        )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"[attached {picture} to the next question]" in out
    assert out.count("a box [0, 0, 999, 999]") == 3  # three questions answered
    # Both answers about the image are drawn (the second turn still refers to it); "hello" has no image.
    assert (tmp_path / "answer_001.png").is_file() and (tmp_path / "answer_002.png").is_file()
    assert not (tmp_path / "answer_003.png").exists()
    assert "error: cannot use image" in out and "no such file" in out
    assert "[unknown command /bogus" in out and "[unknown command /images" in out
    assert "[new conversation]" in out
    assert "reserved for images" in out


def test_ctrl_c_stops_an_answer_and_at_the_prompt_leaves(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MM15Model.from_pretrained(model_dir)
    written: list[str] = []
    session = terminal.ChatSession(model, GenerationConfig(max_new_tokens=5), tmp_path, write=written.append)
    asked: list[str] = []

    def ask(question: str) -> None:
        asked.append(question)
        if len(asked) == 1:
            raise KeyboardInterrupt  # Ctrl+C while the first answer streams

    monkeypatch.setattr(session, "ask", ask)
    lines = iter(["first\n", "second\n"])

    def read_line() -> str:
        line = next(lines, None)
        if line is None:
            raise KeyboardInterrupt  # Ctrl+C at the prompt
        return line

    terminal.interact(session, [], read_line)  # returns: no KeyboardInterrupt escapes
    assert asked == ["first", "second"]  # the chat went on after the stopped answer
    assert "[answer stopped; not kept in the conversation]" in "".join(written)


def test_end_of_input_ends_the_chat(model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["chat", "--model", str(model_dir), "--out", str(tmp_path)], input="")
    assert result.exit_code == 0
    assert "mm15 chat" in result.stdout


def test_clear_errors(model_dir: Path, picture: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["chat", "--model", str(tmp_path / "nothing"), "hi"])
    assert missing.exit_code == 2 and "not an mm15 model directory" in missing.stderr
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes()[:50])
    unreadable = runner.invoke(app, ["chat", "--model", str(model_dir), "--image", str(broken), "hi"])
    assert (
        unreadable.exit_code == 2
        and "cannot use image" in unreadable.stderr
        and "broken.png" in unreadable.stderr
    )
    absent = runner.invoke(
        app, ["chat", "--model", str(model_dir), "--image", str(tmp_path / "gone.png"), "hi"]
    )
    assert absent.exit_code == 2 and "no such file" in absent.stderr
    folder = runner.invoke(app, ["chat", "--model", str(model_dir), "--image", str(tmp_path), "hi"])
    assert folder.exit_code == 2 and "is a directory, not a file" in folder.stderr
    blank = runner.invoke(app, ["chat", "--model", str(model_dir), "  "])
    assert blank.exit_code == 2 and "the prompt is empty" in blank.stderr
    no_room = runner.invoke(app, ["chat", "--model", str(model_dir), "--max-tokens", "100000", "hi"])
    assert no_room.exit_code == 2 and "--max-tokens 100000 leaves no room" in no_room.stderr
    args = ["chat", "--model", str(model_dir), "--max-images", "2", "hi"]
    for _ in range(3):
        args[1:1] = ["--image", str(picture)]
    too_many = runner.invoke(app, args)
    assert too_many.exit_code == 2 and "too many images" in too_many.stderr


def test_an_undecodable_byte_in_piped_input_is_an_error_line_and_the_chat_goes_on(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Strict UTF-8 input (a UTF-8 locale, or PYTHONIOENCODING=utf-8): 0xE9 alone is no character.
    model = MM15Model.from_pretrained(model_dir)
    monkeypatch.setattr(terminal.MM15Model, "from_pretrained", lambda path: model)
    with scripted_answer(model, "fine"):
        result = runner.invoke(
            app,
            ["chat", "--model", str(model_dir), "--out", str(tmp_path), "--max-tokens", "5"],
            input=b"caf\xe9?\nhello\n/quit\n",
        )
    assert result.exit_code == 0, result.output
    assert "not valid Unicode" in result.stdout
    assert result.stdout.count("fine") == 1  # the next question was answered


def test_a_one_shot_prompt_past_the_context_is_one_error_line(model_dir: Path, tmp_path: Path) -> None:
    model = MM15Model.from_pretrained(model_dir)
    context = model.llm.config.max_position_embeddings
    result = runner.invoke(
        app,
        ["chat", "--model", str(model_dir), "--out", str(tmp_path), "--max-tokens", "3", "a" * 2 * context],
    )
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()  # no tokenizer warning before it
    assert line.startswith("error: the prompt needs") and "/reset" not in line


def test_an_out_folder_under_a_file_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    taken = tmp_path / "a.png"
    taken.write_text("notes")
    out = taken / "drawings"
    # No model directory at all: --out is refused first, in a second rather than after the model load.
    result = runner.invoke(app, ["chat", "--model", str(tmp_path / "model"), "--out", str(out), "hi"])
    assert result.exit_code == 2, result.output
    assert f"error: --out {out} cannot be created: {taken} is not a directory" in result.stderr


def test_a_drawing_that_cannot_be_saved_is_an_error_line_and_the_chat_goes_on(
    model_dir: Path, picture: Path, tmp_path: Path
) -> None:
    """The folder is checked at the start; if it becomes a file since, the drawing fails with an error
    line (a traceback once ended the chat), and the answer is kept in the conversation."""
    model = MM15Model.from_pretrained(model_dir)
    out = tmp_path / "drawings"
    out.write_text("a file now")
    written: list[str] = []
    session = terminal.ChatSession(model, GenerationConfig(max_new_tokens=30), out, write=written.append)
    image = load_image(picture)
    session.reset([image])
    lines = iter(["where?\n", "and now?\n"])
    with scripted_answer(model, "at [250, 250, 750, 750]"):
        terminal.interact(session, [image], lambda: next(lines, ""))
    text = "".join(written)
    assert text.count("at [250, 250, 750, 750]") == 2  # both questions answered
    assert text.count(f"error: cannot save the drawing: --out {out} exists and is not a directory") == 2
    assert len(session.turns) == 4 and out.read_text() == "a file now"
