"""``mm15 chat``: talk to a model in the terminal, one question or a whole conversation.

The answer streams to the terminal as it is generated (``mm15.model.generate.stream``). Prompts are
built exactly as the server builds them (``mm15.serve.conversation``) and images become model inputs
through the server's one image function (``mm15.serve.engine.encode_prompt``), so a question asked
here and over HTTP gives the same tokens. When an answer holds boxes or points
(``parse_grounding``), they are drawn on a copy of the conversation's latest image and the PNG's path
is printed.

Interactive commands: ``/image PATH`` attaches an image to the next question, ``/video PATH`` a video
(its ``--frames`` uniformly sampled frames, each one unsplit image, as MM1.5-Video reads clips),
``/reset`` starts over (the ``--image`` images or ``--video`` clip are attached again), ``/quit``, end
of input or Ctrl+C at the prompt leaves; Ctrl+C during an answer stops it (it is not kept). A
conversation holds either images or one video: MM1.5-Video trained on samples with one clip and nothing
else, and a prompt with a video is planned unsplit as a whole.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mm15.hardware import autocast
from mm15.image import ImageError, load_image
from mm15.model.generate import GenerationConfig, parse_grounding, stream
from mm15.model.mm15 import MM15Model, MM15Processor
from mm15.paths import check_output_dir, not_a_dir_reason
from mm15.serve.conversation import Turn, answer_turn, has_video, question_turn, render_prompt, video_turn
from mm15.serve.engine import PromptTooLong, encode_prompt
from mm15.video import DEFAULT_NUM_FRAMES, VideoError, read_video

BOX_COLOR = (230, 30, 30)
POINT_COLOR = (20, 110, 240)
HELP = "commands: /image PATH or /video PATH (attach to the next question), /reset (start over), /quit"


class ChatError(ValueError):
    """A problem the user can fix (bad image or video, too many images, conversation too long)."""


class ContextFullError(ChatError):
    """The conversation and the question do not fit the model's context (interactively, /reset helps)."""


def draw_grounding(image: Image.Image, answer: str) -> tuple[Image.Image, int, int]:
    """A copy of ``image`` with the answer's boxes and points drawn; also their counts."""
    found = parse_grounding(answer, image.height, image.width)
    drawn = image.convert("RGB").copy()
    pen = ImageDraw.Draw(drawn)
    width = max(2, min(image.size) // 150)
    for box in found["boxes"]:
        pen.rectangle(box, outline=BOX_COLOR, width=width)
    radius = max(4, min(image.size) // 60)
    for x, y in found["points"]:
        pen.ellipse((x - radius, y - radius, x + radius, y + radius), outline=POINT_COLOR, width=width)
    return drawn, len(found["boxes"]), len(found["points"])


def next_free_path(directory: Path, stem: str = "answer") -> Path:
    """``answer_001.png``, ``answer_002.png``, ...: the first name not taken (earlier answers are kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    index = 1
    while (directory / f"{stem}_{index:03d}.png").exists():
        index += 1
    return directory / f"{stem}_{index:03d}.png"


def open_image(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except ImageError as err:
        raise ChatError(f"cannot use image {err}") from None


def open_video(path: Path, num_frames: int = DEFAULT_NUM_FRAMES) -> list[Image.Image]:
    """The video's ``num_frames`` uniformly sampled frames (``mm15.video.read_video``)."""
    try:
        return read_video(path, num_frames).frames
    except VideoError as err:
        raise ChatError(f"cannot use video {err}") from None


@dataclass
class ChatSession:
    """A conversation with one model: turns so far, images waiting for the next question."""

    model: MM15Model
    config: GenerationConfig
    out_dir: Path
    max_images: int = 4
    write: Callable[[str], None] = field(default=lambda text: print(text, end="", flush=True))
    turns: list[Turn] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)
    pending_video: list[Image.Image] = field(default_factory=list)  # frames for the next question

    def __post_init__(self) -> None:
        self.processor = MM15Processor.for_model(self.model)

    @property
    def image_count(self) -> int:
        """Images so far and pending (a video's frames are not counted: ``--frames`` bounds them)."""
        return sum(len(turn.images) for turn in self.turns if not turn.video) + len(self.pending)

    @property
    def has_video(self) -> bool:
        return has_video(self.turns) or bool(self.pending_video)

    def attach(self, image: Image.Image) -> None:
        if self.has_video:
            raise ChatError("a conversation holds either images or one video (/reset starts a new one)")
        if self.image_count + 1 > self.max_images:
            raise ChatError(f"too many images: a conversation takes at most {self.max_images}")
        self.pending.append(image)

    def check_video_allowed(self) -> None:
        """Raise ``ChatError`` when a video cannot join this conversation (checked before decoding)."""
        if self.has_video:
            raise ChatError("a conversation holds one video (/reset starts a new one)")
        if self.image_count:
            raise ChatError("a conversation holds either images or one video (/reset starts a new one)")

    def attach_video(self, frames: list[Image.Image]) -> None:
        """Attach a video's frames to the next question (one video per conversation, no images)."""
        self.check_video_allowed()
        if not frames:
            raise ChatError("the video has no frames")
        self.pending_video = list(frames)

    def reset(self, images: list[Image.Image], video: list[Image.Image] | None = None) -> None:
        self.turns, self.pending, self.pending_video = [], [], []
        for image in images:
            self.attach(image)
        if video:
            self.attach_video(video)

    def _context_budget(self) -> int | None:
        context = getattr(self.model.llm.config, "max_position_embeddings", None)
        return None if not context else int(context) - self.config.max_new_tokens

    def ask(self, question: str) -> tuple[str, Path | None]:
        """Stream the answer to ``write``; returns it and the drawing's path (if it has boxes/points).

        A drawing that cannot be saved raises ``ChatError`` after the answer has joined the conversation:
        the question was answered, only the picture is missing.
        """
        try:
            if self.pending_video:
                turn = video_turn(question, self.pending_video)
            else:
                turn = question_turn(question, self.pending)
            turns = [*self.turns, turn]
            prompt, images = render_prompt(self.model.tokenizer, turns)
            encoded = encode_prompt(
                self.processor,
                self.model.image_token_id,
                prompt,
                images,
                self._context_budget(),
                video=has_video(turns),
            )
        except PromptTooLong as err:
            raise ContextFullError(str(err)) from None
        except ValueError as err:
            raise ChatError(str(err)) from None
        batch = {
            "input_ids": torch.tensor([encoded.input_ids]),
            "attention_mask": torch.ones(1, encoded.num_tokens, dtype=torch.long),
            "pixel_values": encoded.pixel_values,
        }
        pieces = []
        with autocast():
            for deltas in stream(self.model, batch, self.config):
                if deltas[0]:
                    pieces.append(deltas[0])
                    self.write(deltas[0])
        answer = "".join(pieces)
        if not answer.strip():
            # Otherwise a blank line, which reads as a hang or a display fault (an untrained model's
            # first token is often its end-of-turn).
            self.write(
                "[the model's answer has no text]" if not answer else "[the model answered only spaces]"
            )
        self.write("\n")
        self.turns += [turn, answer_turn(answer)]
        self.pending, self.pending_video = [], []
        return answer, self._draw(answer, images)

    def _draw(self, answer: str, images: list[Image.Image]) -> Path | None:
        # Boxes are in the coordinates of one image; the latest one is the one being asked about. A
        # video's answer does not say which frame its coordinates would refer to: nothing is drawn.
        if not images or has_video(self.turns):
            return None
        drawn, boxes, points = draw_grounding(images[-1], answer)
        if not boxes and not points:
            return None
        try:
            path = next_free_path(self.out_dir)
            drawn.save(path)
        except OSError as err:  # --out is checked at the start; it can change (or fill up) since
            why = not_a_dir_reason(self.out_dir)  # the likelier cause, in the start-up check's words
            detail = f"--out {self.out_dir} {why}" if why else f"{err.strerror or err} ({self.out_dir})"
            raise ChatError(f"cannot save the drawing: {detail}") from None
        self.write(f"[drew {boxes} box(es) and {points} point(s): {path}]\n")
        return path


def interact(
    session: ChatSession,
    start_images: list[Image.Image],
    read_line: Callable[[], str],
    start_video: list[Image.Image] | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> None:
    """The interactive loop: questions and commands until ``/quit`` or end of input."""
    session.write(f"mm15 chat ({HELP})\n")
    while True:
        session.write("> ")
        try:
            line = read_line()
        except KeyboardInterrupt:  # Ctrl+C at the prompt leaves, as end of input does
            line = ""
        if not line:  # end of input
            session.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        # "/image PATH": the command is the first word, so "/images" is an unknown command, not "/image s".
        words = line.split(maxsplit=1)
        command = words[0] if line.startswith("/") else ""
        path = words[1].strip() if command and len(words) > 1 else ""
        try:
            if command in ("/quit", "/exit"):
                return
            if command == "/reset":
                session.reset(start_images, start_video)
                session.write("[new conversation]\n")
            elif command == "/image":
                if not path:
                    raise ChatError("usage: /image PATH")
                session.attach(open_image(Path(path)))
                session.write(f"[attached {path} to the next question]\n")
            elif command == "/video":
                if not path:
                    raise ChatError("usage: /video PATH")
                session.check_video_allowed()  # before the (slow) decoding
                frames = open_video(Path(path), num_frames)
                session.attach_video(frames)
                session.write(f"[attached {path} ({len(frames)} frames) to the next question]\n")
            elif command:
                session.write(f"[unknown command {command}; {HELP}]\n")
            else:
                session.ask(line)
        except ContextFullError as err:
            session.write(f"error: {err} (/reset starts a new conversation)\n")
        except ChatError as err:
            session.write(f"error: {err}\n")
        except KeyboardInterrupt:
            # Ctrl+C during an answer stops that answer; the conversation goes on without it.
            session.write("\n[answer stopped; not kept in the conversation]\n")


def run_chat(
    model_dir: Path,
    prompt: str | None,
    image_paths: list[Path],
    config: GenerationConfig,
    out_dir: Path,
    max_images: int,
    video_path: Path | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> int:
    """``mm15 chat``; returns the exit code (2 for a problem with the arguments).

    ``video_path`` attaches that video's ``num_frames`` sampled frames to the first question.
    """

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 2

    if len(image_paths) > max_images:
        return fail(f"too many images: {len(image_paths)} given, at most {max_images} (--max-images)")
    if video_path is not None and image_paths:
        return fail("give either --image or --video: a conversation holds either images or one video")
    if num_frames < 1:
        return fail(f"--frames must be at least 1, got {num_frames}")
    if prompt is not None and not prompt.strip():
        # The interactive loop skips blank lines; a blank one-shot question is a mistake, not a question.
        return fail("the prompt is empty: give a question, or no prompt to chat interactively")
    try:
        # Drawings are made only for answers with boxes or points, after the answer: a folder that
        # cannot be made is found now, not by the first drawing.
        check_output_dir(out_dir, "--out")
    except ValueError as err:
        return fail(str(err))
    try:
        images = [open_image(path) for path in image_paths]
        video = open_video(video_path, num_frames) if video_path is not None else None
    except ChatError as err:
        return fail(str(err))
    try:
        model = MM15Model.from_pretrained(model_dir)
    except (FileNotFoundError, ValueError) as err:
        return fail(f"cannot load the model: {err}")
    context = getattr(model.llm.config, "max_position_embeddings", None)
    if context and config.max_new_tokens >= context:
        return fail(
            f"--max-tokens {config.max_new_tokens} leaves no room for the question: the model's context is "
            f"{context} tokens, prompt and answer together"
        )
    session = ChatSession(model, config, out_dir, max_images=max_images)
    session.reset(images, video)
    if prompt is not None:
        try:
            session.ask(prompt)
        except ChatError as err:
            return fail(str(err))
        return 0
    if isinstance(sys.stdin, io.TextIOWrapper):
        # A byte that is not valid in the terminal's encoding (a strict UTF-8 locale) would raise out of
        # readline and end the chat; escaped, it reaches the question check, which reports it.
        sys.stdin.reconfigure(errors="surrogateescape")
    interact(session, images, sys.stdin.readline, video, num_frames)
    return 0
