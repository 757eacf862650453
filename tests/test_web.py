"""The web page in a real browser (Debian's chromium driven by Playwright): upload an image, ask, watch
the streamed answer appear and its box drawn on the canvas; a screenshot goes to the test's tmp dir."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from serve_helpers import build_test_model, png_bytes, scripted_answer

from mm15.image import load_image
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


def serve_page(model: MM15Model) -> Any:
    """Serve ``model`` with the page's settings; yields the server's URL until the fixture ends."""
    with Engine(model) as engine:
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
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = MM15Model.from_pretrained(build_test_model(tmp_path_factory.mktemp("web") / "model"))
    with scripted_answer(model, ANSWER):
        yield from serve_page(model)


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


def posted(page: Any) -> list[dict[str, Any]]:
    """The page's POST bodies, as they are sent."""
    bodies: list[dict[str, Any]] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.method == "POST" else None)
    return bodies


def open_page(browser: Any, url: str, **options: Any) -> tuple[Any, list[str], list[dict[str, Any]]]:
    """A new page at ``url`` once the model's name shows: (page, its script errors, its POST bodies)."""
    page = browser.new_page(**options)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    sent = posted(page)
    page.goto(url)
    wait_for_model_name(page)
    return page, errors, sent


def ask(page: Any, question: str) -> Any:
    """Ask ``question`` (64 tokens at most) and wait for the whole streamed answer; returns its element."""
    page.fill("#question", question)
    page.fill("#maxTokens", "64")
    page.click("#send")
    return page.wait_for_selector(".turn.assistant[data-done='true']", timeout=30_000)


def test_upload_ask_stream_and_draw(page_url: str, browser: Any, tmp_path: Path) -> None:
    image = tmp_path / "square.png"
    image.write_bytes(png_bytes(200, 100, (40, 160, 60)))
    page, errors, _ = open_page(browser, page_url, viewport={"width": 1200, "height": 800})
    page.set_input_files("#files", str(image))
    page.wait_for_selector("#thumbs img")
    answer = ask(page, "where is the square?")
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
    page, _, _ = open_page(browser, page_url)
    page.fill("#question", "say <image> here")  # refused by the server: reserved text
    page.fill("#maxTokens", "64")
    page.click("#send")
    error = page.wait_for_selector(".turn.error", timeout=30_000)
    assert "reserved for images" in (error.text_content() or "")
    page.close()


def test_a_video_file_is_sent_as_video_url(page_url: str, browser: Any, tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in ((200, 40, 40), (40, 200, 40), (40, 40, 200))]
    clip = write_video(tmp_path / "clip.mp4", frames, fps=3)
    page, errors, sent = open_page(browser, page_url)
    page.set_input_files("#files", str(clip))
    page.wait_for_selector("#thumbs .video")
    answer = ask(page, "what moves?")
    assert answer.text_content() == ANSWER
    assert "[1 video(s)] what moves?" in (page.text_content(".turn.user") or "")
    part = sent[-1]["messages"][-1]["content"][0]
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/mp4;base64,")
    assert page.locator("#canvas").get_attribute("data-boxes") == "0"
    assert not errors, errors
    page.close()


@pytest.mark.parametrize(
    ("name", "browser_type"),
    [("clip", ""), ("clip.ts", "text/vnd.trolltech.linguist")],  # chromium's type for .ts
)
def test_a_video_the_browser_does_not_type_as_one_is_sent_as_video_url(
    page_url: str, browser: Any, tmp_path: Path, name: str, browser_type: str
) -> None:
    """The page chose by the browser's media type alone: a file without an extension (type "") or a
    .ts file was "not an image this browser can show", though the server decodes both."""
    # 20 frames: FFmpeg cannot probe a transport stream of two (too few packets).
    frames = [Image.new("RGB", (64, 48), (200, 40, 40) if k % 2 else (40, 200, 40)) for k in range(20)]
    clip = write_video(tmp_path / ("clip.ts" if name.endswith(".ts") else "clip.mp4"), frames, fps=10)
    page, errors, sent = open_page(browser, page_url)
    page.set_input_files(
        "#files", files=[{"name": name, "mimeType": browser_type, "buffer": clip.read_bytes()}]
    )
    page.wait_for_selector("#thumbs .video")
    answer = ask(page, "what moves?")
    assert answer.text_content() == ANSWER
    part = sent[-1]["messages"][-1]["content"][0]
    expected = "data:video/mp2t;base64," if name.endswith(".ts") else "data:video/mp4;base64,"
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith(expected)
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


# An answer slowed to 70 ms a token streams for about 3 s: long enough to click "New conversation" or
# choose an image while it streams.
SLOW_ANSWER = "the answer goes on and on and on, slowly"


@contextmanager
def slowed(model: MM15Model, seconds: float) -> Iterator[None]:
    """Each decoding step of ``model`` (inside ``scripted_answer``) takes ``seconds`` longer."""
    step = model.llm.forward

    def slow_step(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return step(*args, **kwargs)

    model.llm.forward = slow_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        model.llm.forward = step  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def slow_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model = MM15Model.from_pretrained(build_test_model(tmp_path_factory.mktemp("web-slow") / "model"))
    with scripted_answer(model, SLOW_ANSWER), slowed(model, 0.07):
        yield from serve_page(model)


def test_new_conversation_while_an_answer_streams_starts_afresh(
    slow_url: str, browser: Any, tmp_path: Path
) -> None:
    """The old answer is stopped and none of it (nor its question) joins the new conversation; the
    page is free at once. It once pushed both into the new conversation when the answer ended."""
    image = tmp_path / "square.png"
    image.write_bytes(png_bytes(200, 100, (40, 160, 60)))
    page, errors, sent = open_page(browser, slow_url)
    page.set_input_files("#files", str(image))
    page.wait_for_selector("#thumbs img")
    page.fill("#question", "first question")
    page.fill("#maxTokens", "64")
    page.click("#send")
    page.wait_for_selector(".turn.assistant:not(:empty)", timeout=30_000)  # streaming
    page.click("#reset")
    assert page.inner_text("#log") == "" and page.locator("#thumbs img").count() == 0
    assert page.is_enabled("#send")  # at once, not when the old answer would have ended
    page.wait_for_timeout(4_000)  # longer than the whole old answer would take
    assert page.inner_text("#log") == ""
    page.fill("#question", "a new question")
    page.click("#send")
    page.wait_for_selector(".turn.assistant[data-done='true']", timeout=30_000)
    assert sent[-1]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "a new question"}]}]
    assert [t.text_content() for t in page.query_selector_all(".turn")] == ["a new question", SLOW_ANSWER]
    assert not errors, errors
    page.close()


def test_an_image_chosen_while_an_answer_streams_goes_with_the_next_question(
    slow_url: str, browser: Any, tmp_path: Path
) -> None:
    """It was dropped: the end of the answer cleared every pending file, not only the ones it sent."""
    image = tmp_path / "square.png"
    image.write_bytes(png_bytes(200, 100, (40, 160, 60)))
    page, _, sent = open_page(browser, slow_url)
    page.fill("#question", "a text-only question")
    page.fill("#maxTokens", "64")
    page.click("#send")
    page.wait_for_selector(".turn.assistant:not(:empty)", timeout=30_000)
    page.set_input_files("#files", str(image))
    page.wait_for_selector("#thumbs img")
    page.fill("#question", "and this image?")  # typed while the first answer streams: kept
    assert page.locator(".turn.assistant[data-done='true']").count() == 0  # still streaming
    page.wait_for_selector(".turn.assistant[data-done='true']", timeout=30_000)
    assert page.input_value("#question") == "and this image?"
    page.click("#send")
    page.wait_for_selector(".turn.assistant[data-done='true'] >> nth=1", timeout=30_000)
    assert [part["type"] for part in sent[0]["messages"][-1]["content"]] == ["text"]
    assert [part["type"] for part in sent[1]["messages"][-1]["content"]] == ["image_url", "text"]
    assert "[1 image(s)] and this image?" in page.inner_text("#log")
    page.close()


QUADRANTS = ((220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 200, 40))


def oriented(path: Path, orientation: int, *, how: str = "exif") -> Path:
    """A 48 x 24 picture of four coloured quadrants, stored with that orientation, written ``how``:
    ``exif``, ``xmp``, or in a PNG's text chunks as ImageMagick writes them (``raw-profile``: EXIF as
    hex in a compressed zTXt "Raw profile type exif"; ``xmp-compressed``: XMP in a compressed iTXt)."""
    from PIL import PngImagePlugin

    picture = Image.new("RGB", (48, 24))
    for k, colour in enumerate(QUADRANTS):
        picture.paste(colour, ((k % 2) * 24, (k // 2) * 12, (k % 2) * 24 + 24, (k // 2) * 12 + 12))
    options: dict[str, Any] = {"lossless": True} if path.suffix == ".webp" else {}
    if path.suffix == ".jpg":
        options["quality"] = 95
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-'
        'syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>'
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    if how == "xmp":
        options["xmp"] = xmp.encode()
    elif how == "exif":
        options["exif"] = exif.tobytes()
    else:
        info = PngImagePlugin.PngInfo()
        if how == "raw-profile":
            hexed = exif.tobytes().hex()  # "Exif\0\0" and the TIFF block
            lines = "\n".join(hexed[k : k + 72] for k in range(0, len(hexed), 72))
            info.add_text("Raw profile type exif", f"\nexif\n{len(hexed) // 2:8d}\n{lines}\n", zip=True)
        else:
            info.add_itxt("XML:com.adobe.xmp", xmp, zip=True)
        options["pnginfo"] = info
    picture.save(path, **options)
    return path


CANVAS_PIXEL = (
    "([x, y]) => Array.from(document.getElementById('canvas').getContext('2d').getImageData(x, y, 1, 1).data)"
)


@pytest.mark.parametrize(
    ("name", "orientation", "how"),
    [
        *((f"o{o}.webp", o, "exif") for o in range(1, 9)),
        ("o6.jpg", 6, "exif"),
        ("o3.jpg", 3, "exif"),
        ("o6.png", 6, "exif"),
        ("o7.png", 7, "exif"),
        ("xmp8.webp", 8, "xmp"),
        ("xmp6.jpg", 6, "xmp"),
        ("raw6.png", 6, "raw-profile"),
        ("zxmp8.png", 8, "xmp-compressed"),
    ],
)
def test_boxes_are_drawn_on_the_upright_frame_the_model_sees(
    page_url: str, browser: Any, tmp_path: Path, name: str, orientation: int, how: str
) -> None:
    """The server turns an image upright by its orientation (Pillow: EXIF, else ImageMagick's raw EXIF
    profile, else XMP, in PNG text chunks compressed or not); chromium does not for WebP (nor any
    browser for XMP or a PNG's text chunks), so the page drew the boxes on a sideways frame."""
    path = oriented(tmp_path / name, orientation, how=how)
    assert load_image(path).size == ((24, 48) if orientation >= 5 else (48, 24))  # Pillow does turn it
    upright = load_image(path)  # what the server makes of the file
    page, errors, _ = open_page(browser, page_url)
    page.set_input_files("#files", str(path))
    page.wait_for_selector("#thumbs img")
    canvas = page.locator("#canvas")
    assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == tuple(map(str, upright.size))
    width, height = upright.size
    tolerance = 40 if name.endswith(".jpg") else 2
    for x in (width // 4, 3 * width // 4):
        for y in (height // 4, 3 * height // 4):
            shown = page.evaluate(CANVAS_PIXEL, [x, y])[:3]
            expected = upright.getpixel((x, y))
            assert max(abs(a - b) for a, b in zip(shown, expected, strict=True)) <= tolerance, (x, y, shown)
    assert not errors, errors
    page.close()


def test_an_unreachable_server_is_said_on_the_page(page_url: str, browser: Any) -> None:
    """The header once stayed at "connecting..." and Ask did nothing at all."""
    page = browser.new_page()
    page.route("**/v1/**", lambda route: route.abort())
    page.goto(page_url)
    page.locator("#model", has_text="cannot reach the server").wait_for(timeout=10_000)
    page.fill("#question", "hello")
    page.click("#send")
    error = page.wait_for_selector(".turn.error", timeout=10_000)
    assert "cannot reach the server" in (error.text_content() or "")
    assert page.is_enabled("#send")
    page.close()


def test_an_image_file_without_a_media_type_is_sent_as_an_image(page_url: str, browser: Any) -> None:
    """A file without an extension has no type in the browser; its data URL said
    application/octet-stream, which the server refuses."""
    page, _, sent = open_page(browser, page_url)
    page.set_input_files("#files", files=[{"name": "photo", "mimeType": "", "buffer": png_bytes(200, 100)}])
    page.wait_for_selector("#thumbs img")
    answer = ask(page, "where is the square?")
    assert answer.text_content() == ANSWER
    url = sent[-1]["messages"][-1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,"), url[:40]
    page.close()
