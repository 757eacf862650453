"""Chat turns -> one prompt with ``<image>`` placeholders, rendered by the model's chat template.

The terminal chat and the HTTP API both build prompts here, so the same conversation gives the same
tokens whichever way it arrives. Images sit in their turn's text as ``<image>`` placeholders, in order;
a turn built from a question and images puts the images first, one per line, as MM1.5's training data
does (``"<image>\\n<image>\\nquestion"``). A video's frames are written as MM1.5-Video's training
samples write them (the synthetic ``video`` generator and ``VideoQAReader``): one placeholder per
frame with nothing between them, then a newline and the question (``"<image><image><image>\\nquestion"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mm15.chat import chat_template
from mm15.model.mm15 import IMAGE_PLACEHOLDER, IMAGE_TOKEN, escape_special_tokens

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    """One message: ``text`` holds one ``<image>`` placeholder per entry of ``images``, in order.

    ``video`` marks ``images`` as a video's frames: a prompt holding such a turn is planned unsplit.
    """

    role: str
    text: str
    images: list[Image.Image] = field(default_factory=list)
    video: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        count = self.text.count(IMAGE_PLACEHOLDER)
        if count != len(self.images):
            raise ValueError(
                f"the turn has {count} {IMAGE_PLACEHOLDER} placeholders but {len(self.images)} images"
            )


def check_unicode(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes can
    carry): it cannot be tokenised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: the text is not valid Unicode (a lone surrogate at character {err.start})"
        ) from None


def check_user_text(text: str, where: str) -> None:
    """Refuse text that would be read as an image slot: placeholders come only from real images.

    A literal ``<image>`` would shift every later image onto the wrong placeholder, and the image token
    itself would give the model more image positions than features. Text must be valid Unicode too.
    """
    check_unicode(text, where)
    for reserved in (IMAGE_PLACEHOLDER, IMAGE_TOKEN):
        if reserved in text:
            raise ValueError(
                f"{where}: the text contains {reserved!r}, which is reserved for images; "
                "attach images as images instead"
            )


def defuse_image_slots(text: str) -> str:
    """``<image>`` and the image token written as text split by a zero-width space: they stay text.

    A model's answer may write them (an untrained or confused model does); kept verbatim in the
    conversation it continues, they would read as image slots without images.
    """
    for reserved in (IMAGE_PLACEHOLDER, IMAGE_TOKEN):
        text = text.replace(reserved, reserved[0] + "\u200b" + reserved[1:])
    return text


def answer_turn(answer: str) -> Turn:
    """The model's answer as an assistant turn of the conversation it continues (image slots defused)."""
    return Turn("assistant", defuse_image_slots(answer))


def question_turn(question: str, images: Sequence[Image.Image] = ()) -> Turn:
    """A user turn: the images first, one placeholder per line, then the question."""
    check_user_text(question, "the question")
    return Turn("user", f"{IMAGE_PLACEHOLDER}\n" * len(images) + question, list(images))


def video_turn(question: str, frames: Sequence[Image.Image]) -> Turn:
    """A user turn about a video: one placeholder per frame, back to back, then the question."""
    check_user_text(question, "the question")
    if not frames:
        raise ValueError("a video turn needs at least one frame")
    return Turn("user", f"{IMAGE_PLACEHOLDER * len(frames)}\n{question}", list(frames), video=True)


def has_video(turns: Sequence[Turn]) -> bool:
    """Whether the conversation holds a video: then all its images are planned as unsplit frames."""
    return any(turn.video for turn in turns)


def render_prompt(tokenizer: Any, turns: Sequence[Turn]) -> tuple[str, list[Image.Image]]:
    """The prompt text, ending with the assistant's generation header, and its images in order."""
    if not turns:
        raise ValueError("a conversation needs at least one message")
    # A special-token string a message writes stays text: it cannot open or close a turn.
    messages = [{"role": turn.role, "content": escape_special_tokens(turn.text, tokenizer)} for turn in turns]
    prompt = tokenizer.apply_chat_template(
        messages, chat_template=chat_template(tokenizer), tokenize=False, add_generation_prompt=True
    )
    return prompt, [image for turn in turns for image in turn.images]
