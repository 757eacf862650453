"""The web page in a real browser (Debian's chromium driven by Playwright): upload an image, ask, watch
the streamed answer appear and its box drawn on the canvas; a screenshot goes to the test's tmp dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from serve_helpers import build_test_model, png_bytes, scripted_answer

from mm15.model.mm15 import MM15Model
from mm15.serve.api import create_app
from mm15.serve.engine import Engine
from mm15.serve.server import start_server
from mm15.serve.settings import ServeSettings
from mm15.video import write_video

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER = "the green square is at [250, 250, 750, 750]"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="Debian's chromium is not installed (apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = MM15Model.from_pretrained(build_test_model(tmp_path_factory.mktemp("web") / "model"))
    with scripted_answer(model, ANSWER), Engine(model) as engine:
        server = start_server(
            create_app(
                engine, ServeSettings(model_name="tiny-web", max_tokens_limit=64, default_max_tokens=64)
            )
        )
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def wait_for_model_name(page: Any) -> None:
    """Until the page shows the served model's name (fetched from /v1/models).

    A locator wait, not ``wait_for_function``: a string predicate is evaluated like ``eval``, which the
    page's Content-Security-Policy (no 'unsafe-eval') may refuse.
    """
    page.locator("#model", has_text="tiny-web").wait_for()


def test_upload_ask_stream_and_draw(page_url: str, browser: Any, tmp_path: Path) -> None:
    image = tmp_path / "square.png"
    image.write_bytes(png_bytes(200, 100, (40, 160, 60)))
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(page_url)
    wait_for_model_name(page)
    page.set_input_files("#files", str(image))
    page.wait_for_selector("#thumbs img")
    page.fill("#question", "where is the square?")
    page.fill("#maxTokens", "64")
    page.click("#send")
    answer = page.wait_for_selector(".turn.assistant[data-done='true']", timeout=30_000)
    assert answer.text_content() == ANSWER
    canvas = page.locator("#canvas")
    assert canvas.get_attribute("data-boxes") == "1"
    assert canvas.get_attribute("width") == "200"
    # The box's left edge at x = (250 + 0.5) * 200 / 1000 = 50.1, halfway down: drawn red.
    pixel = page.evaluate(
        "Array.from(document.getElementById('canvas').getContext('2d').getImageData(50, 50, 1, 1).data)"
    )
    assert pixel[0] > 200 and pixel[1] < 80 and pixel[2] < 80, pixel
    inside = page.evaluate(
        "Array.from(document.getElementById('canvas').getContext('2d').getImageData(100, 50, 1, 1).data)"
    )
    assert inside[:3] == [40, 160, 60]  # the image itself, untouched inside the box
    assert "1 box(es)" in page.text_content("#found")
    page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
    assert (tmp_path / "web.png").stat().st_size > 1000
    assert not errors, errors
    page.close()


def test_a_server_error_is_shown_on_the_page(page_url: str, browser: Any) -> None:
    page = browser.new_page()
    page.goto(page_url)
    wait_for_model_name(page)
    page.fill("#question", "say <image> here")  # refused by the server: reserved text
    page.fill("#maxTokens", "64")
    page.click("#send")
    error = page.wait_for_selector(".turn.error", timeout=30_000)
    assert "reserved for images" in (error.text_content() or "")
    page.close()


def test_a_video_file_is_sent_as_video_url(page_url: str, browser: Any, tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((200, 40, 40), (40, 200, 40), (40, 40, 200))]
    clip = write_video(tmp_path / "clip.mp4", frames, fps=3)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    sent: list[dict[str, Any]] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" else None)
    page.goto(page_url)
    wait_for_model_name(page)
    page.set_input_files("#files", str(clip))
    page.wait_for_selector("#thumbs .video")
    page.fill("#question", "what moves?")
    page.fill("#maxTokens", "64")
    page.click("#send")
    answer = page.wait_for_selector(".turn.assistant[data-done='true']", timeout=30_000)
    assert answer.text_content() == ANSWER
    assert "[1 video(s)] what moves?" in (page.text_content(".turn.user") or "")
    part = sent[-1]["messages"][-1]["content"][0]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert page.locator("#canvas").get_attribute("data-boxes") == "0"
    assert not errors, errors
    page.close()


def test_an_answer_without_text_says_so(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An untrained model often ends its turn at once; the page says so instead of an empty bubble."""
    model = MM15Model.from_pretrained(build_test_model(tmp_path_factory.mktemp("web-empty") / "model"))
    with scripted_answer(model, ""), Engine(model) as engine:
        server = start_server(
            create_app(
                engine, ServeSettings(model_name="tiny-web", max_tokens_limit=64, default_max_tokens=64)
            )
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            wait_for_model_name(page)
            page.fill("#question", "anything?")
            page.fill("#maxTokens", "8")
            page.click("#send")
            answer = page.wait_for_selector(".turn.assistant[data-done='true']", timeout=30_000)
            assert answer.text_content() == "[the model's answer has no text]"
            page.close()
        finally:
            server.stop()
