"""mm15 serve with a video: the official openai client sends a ``video_url`` data URL and gets the
answer generate() gives on the clip's unsplit frames; bad videos are 4xx and the server keeps serving."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image
from serve_helpers import build_test_model, data_url, png_bytes

from mm15.eval.runner import generate_texts
from mm15.model.generate import GenerationConfig
from mm15.model.mm15 import MM15Model
from mm15.serve.api import create_app
from mm15.serve.conversation import render_prompt, video_turn
from mm15.serve.engine import Engine
from mm15.serve.errors import APIError
from mm15.serve.media import decode_video
from mm15.serve.server import start_server
from mm15.serve.settings import MiB, ServeSettings
from mm15.video import read_video, write_video

MODEL = "tiny-video"
SETTINGS = ServeSettings(
    model_name=MODEL,
    max_body_bytes=1 * MiB,
    max_image_bytes=256 * 1024,
    max_video_bytes=64 * 1024,
    max_video_frames=4,
    max_prompt_tokens=1024,
    max_tokens_limit=32,
    default_max_tokens=8,
)
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40), (200, 40, 200), (40, 200, 200)]


@dataclass
class Served:
    url: str
    reference: MM15Model
    clip: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # float32 as in tests/test_serve.py: the server's answer must equal generate()'s token for token.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MM15_DTYPE", "float32")
        root = tmp_path_factory.mktemp("serve-video")
        model_dir = build_test_model(root / "model")
        frames = [Image.new("RGB", (64, 48), colour) for colour in COLOURS]
        clip = write_video(root / "clip.mp4", frames, fps=6)
        engine = Engine(MM15Model.from_pretrained(model_dir), max_batch=4).start()
        server = start_server(create_app(engine, SETTINGS))
        try:
            yield Served(server.url, MM15Model.from_pretrained(model_dir), clip)
        finally:
            server.stop()
            engine.close()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def video_message(url: str, question: str = "what moves?", **extra: Any) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "video_url", "video_url": {"url": url, **extra}},
            {"type": "text", "text": question},
        ],
    }


def video_url(data: bytes) -> str:
    return f"data:video/mp4;base64,{base64.b64encode(data).decode()}"


def expected(served: Served, num_frames: int, max_new_tokens: int) -> str:
    """generate() on the clip's frames, planned unsplit (the evaluation runner's video path)."""
    model = served.reference
    frames = read_video(served.clip, num_frames).frames
    prompt, images = render_prompt(model.tokenizer, [video_turn("what moves?", frames)])
    return generate_texts(
        model, [prompt], [images], GenerationConfig(max_new_tokens=max_new_tokens), video=True
    )[0]


def test_openai_client_sends_a_video_url(served: Served) -> None:
    api = client(served.url)
    url = video_url(served.clip.read_bytes())
    for extra, frames in (({"num_frames": 2}, 2), ({}, SETTINGS.max_video_frames)):
        # The openai client passes a content part type it does not know through as the dict given.
        result = api.chat.completions.create(
            model=MODEL, messages=[video_message(url, **extra)], max_tokens=6, temperature=0
        )
        assert result.choices[0].message.content == expected(served, frames, 6)
        # One unsplit tile per frame: the prompt grows by tokens_per_tile (+ its marker) per frame.
        assert result.usage is not None and result.usage.prompt_tokens > frames * 16


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        ("corrupt", 400, "invalid_video"),
        ("empty", 400, "invalid_video"),
        ("oversize", 413, "video_too_large"),
        ("bad-base64", 400, "invalid_base64"),
        ("image-type", 400, "invalid_video_url"),
        ("remote", 400, "remote_videos_disabled"),
        ("local", 400, "local_files_disabled"),
        ("many-frames", 400, "too_many_frames"),
        ("zero-frames", 400, "invalid_value"),
        ("two-videos", 400, "too_many_videos"),
        ("with-image", 400, "invalid_value"),
        ("assistant", 400, "invalid_value"),
    ],
)
def test_bad_videos_are_refused(served: Served, content: str, status: int, code: str) -> None:
    good = video_url(served.clip.read_bytes())
    messages: list[dict[str, Any]] = {
        "corrupt": [video_message(video_url(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000)))],
        "empty": [video_message("data:video/mp4;base64,")],
        "oversize": [video_message(video_url(os.urandom(80 * 1024)))],
        "bad-base64": [video_message("data:video/mp4;base64,@@not base64@@")],
        "image-type": [video_message(data_url(png_bytes()))],
        "remote": [video_message("http://127.0.0.1:9/clip.mp4")],
        "local": [video_message(str(served.clip))],
        "many-frames": [video_message(good, num_frames=SETTINGS.max_video_frames + 1)],
        "zero-frames": [video_message(good, num_frames=0)],
        "two-videos": [
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": good}},
                    {"type": "video_url", "video_url": {"url": good}},
                ],
            }
        ],
        "with-image": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                    {"type": "video_url", "video_url": {"url": good}},
                ],
            }
        ],
        "assistant": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "video_url", "video_url": {"url": good}}]},
            {"role": "user", "content": "and?"},
        ],
    }[content]
    with pytest.raises(openai.APIStatusError) as caught:
        client(served.url).chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    error = caught.value
    assert error.status_code == status, error.message
    assert error.code == code, error.message
    assert "video" in error.message and error.param is not None and "messages" in error.param
    assert "mm15-video-" not in error.message  # the temporary file is never named
    # The server is still serving.
    again = client(served.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert again.choices[0].finish_reason in ("stop", "length")


def test_frames_over_the_pixel_limit_are_413(served: Served) -> None:
    small = ServeSettings(max_image_pixels=64 * 48 - 1)
    with pytest.raises(APIError) as caught:
        decode_video(served.clip.read_bytes(), small, "video", 2)
    assert caught.value.status == 413 and caught.value.code == "video_too_large"
    assert "64x48" in caught.value.message
    assert len(decode_video(served.clip.read_bytes(), SETTINGS, "video", 2)) == 2


def test_more_decoding_than_the_budget_is_413(served: Served, tmp_path: Path) -> None:
    """Bytes do not bound decoding: a small file of many still frames costs as much as a large one."""
    frames = [Image.new("RGB", (64, 48), (k, 0, 0)) for k in range(40)]
    write_video(tmp_path / "many.mp4", frames, fps=10)
    write_video(tmp_path / "many.mkv", frames, fps=10)  # no declared count: counted while decoding
    pixels = 64 * 48
    for name in ("many.mp4", "many.mkv"):
        data = (tmp_path / name).read_bytes()
        # 2 frames sampled from 40 (indices 10 and 30): an MP4 decodes 31 frames, an MKV 40 + 31.
        needed = 31 * pixels if name.endswith(".mp4") else 71 * pixels
        fits = ServeSettings(max_video_decode_pixels=needed)
        assert len(decode_video(data, fits, "video", 2)) == 2
        with pytest.raises(APIError, match="max_decoded_pixels") as caught:
            decode_video(data, ServeSettings(max_video_decode_pixels=needed - 1), "video", 2)
        assert caught.value.status == 413 and caught.value.code == "video_too_large"
        assert "mm15-video-" not in caught.value.message
