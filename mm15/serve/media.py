"""Image and video URLs of a request -> decoded images or frames, under the server's limits and switches.

This is the one place where a client's image or video reference is read. A ``data:image/...;base64,``
(``data:video/...;base64,`` for a video) URL is always accepted; ``http(s)://`` URLs only with
``allow_remote_images`` (the server would fetch any address it is given, including ones on its own
network) and ``file://`` URLs or plain paths only with ``allow_local_files`` (the server would read
any file its user can read). Sizes are checked before work: the base64 length before decoding, the
file size before reading, the pixel count from the image header before decoding pixels
(``mm15.image.load_image``); a video is limited by ``max_video_bytes`` and its frames by
``max_image_pixels`` each (``mm15.video.read_video``).

A video's bytes are decoded with PyAV from a temporary file (FFmpeg's demuxers need to seek, which a
pipe cannot), deleted as soon as the frames are read.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, unquote, urlsplit

from PIL import Image

from mm15.image import ImageDecodeError, ImageTooLargeError, load_image
from mm15.paths import not_a_file_reason
from mm15.serve.errors import APIError
from mm15.serve.settings import ServeSettings
from mm15.video import VideoError, VideoTooLargeError, read_video

log = logging.getLogger("mm15.serve")

Kind = Literal["image", "video"]
# An example data URL of each kind, for error messages.
_EXAMPLE = {"image": "data:image/png;base64,...", "video": "data:video/mp4;base64,..."}


def _split(url: str, param: str, kind: Kind) -> SplitResult:
    """``urlsplit``, with a malformed URL (``http://[::1/x``: an unclosed or invalid IPv6 host) a 400."""
    try:
        return urlsplit(url)
    except ValueError as err:
        raise APIError(
            400, f"{param}: the {kind} URL is malformed ({err})", param=param, code=f"invalid_{kind}_url"
        ) from None


def _limit(settings: ServeSettings, kind: Kind) -> int:
    return settings.max_image_bytes if kind == "image" else settings.max_video_bytes


def _too_large(param: str, size: int, limit: int, kind: Kind = "image") -> APIError:
    return APIError(
        413,
        f"{param}: the {kind} is {size} bytes, over this server's limit of {limit} bytes",
        param=param,
        code=f"{kind}_too_large",
    )


def _data_url_bytes(url: str, settings: ServeSettings, param: str, kind: Kind = "image") -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    bad_url = f"invalid_{kind}_url"
    if not comma:
        raise APIError(400, f"{param}: a data URL needs a comma before its data", param=param, code=bad_url)
    media_type, *options = header.split(";")
    if "base64" not in options:
        raise APIError(
            400,
            f"{param}: only base64 data URLs are accepted ({_EXAMPLE[kind]})",
            param=param,
            code=bad_url,
        )
    if media_type and not media_type.lower().startswith(f"{kind}/"):
        article = "an" if kind == "image" else "a"
        raise APIError(
            400, f"{param}: media type {media_type!r} is not {article} {kind}", param=param, code=bad_url
        )
    payload = "".join(payload.split())  # some encoders wrap base64 into lines
    # Base64 carries 3 bytes per 4 characters, less one per "=" of padding: refuse an oversize file
    # before decoding it.
    limit = _limit(settings, kind)
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > limit:
        raise _too_large(param, size, limit, kind)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{param}: the data URL is not valid base64", param=param, code="invalid_base64"
        ) from None


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only: urllib would also follow one to ftp://."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-http(s) URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# No proxy handler either: a fetch goes straight to the address the client named.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HTTPOnlyRedirects())


def _read_until(response: Any, limit: int, deadline: float) -> bytes:
    """Up to ``limit`` bytes of ``response``, or ``TimeoutError`` once ``deadline`` (monotonic) passes.

    The socket's timeout bounds each read only: a host sending a byte every few seconds would hold a
    request (and a worker of the pool every request is prepared in) for as long as it liked.
    """
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        if time.monotonic() > deadline:
            raise TimeoutError("the remote host took longer than the fetch timeout to send it")
        chunk = response.read1(min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _remote_bytes(url: str, settings: ServeSettings, param: str, kind: Kind = "image") -> bytes:
    limit = _limit(settings, kind)
    timeout = settings.remote_fetch_timeout_s
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mm15-serve"})
        deadline = time.monotonic() + timeout
        with _OPENER.open(request, timeout=timeout) as response:
            data = _read_until(response, limit + 1, deadline)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise APIError(
            400, f"{param}: could not fetch the {kind} ({err})", param=param, code=f"{kind}_fetch_failed"
        ) from None
    if len(data) > limit:
        raise _too_large(param, len(data), limit, kind)
    return data


def _local_bytes(location: str, settings: ServeSettings, param: str, kind: Kind = "image") -> bytes:
    path = Path(unquote(_split(location, param, kind).path) if location.startswith("file:") else location)
    # Never raises: a name over the length limit was a 500 from Path.is_file, not the client's 400.
    if (problem := not_a_file_reason(path)) is not None:
        raise APIError(
            400, f"{param}: the file on the server: {problem}", param=param, code=f"invalid_{kind}_url"
        )
    limit = _limit(settings, kind)
    try:
        size = path.stat().st_size
        if size > limit:
            raise _too_large(param, size, limit, kind)
        # The size stated is not a bound (a /proc file states 0): read no more than one byte over.
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError as err:
        raise APIError(
            400, f"{param}: could not read the file ({err.strerror})", param=param, code=f"invalid_{kind}_url"
        ) from None
    if len(data) > limit:
        raise APIError(
            413,
            f"{param}: the {kind} is over this server's limit of {limit} bytes",
            param=param,
            code=f"{kind}_too_large",
        )
    return data


def image_bytes(url: str, settings: ServeSettings, param: str, kind: Kind = "image") -> bytes:
    """The bytes behind an image (or ``kind="video"``) URL, or an ``APIError`` naming ``param`` and
    the rule it broke."""
    scheme = _split(url, param, kind).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return _data_url_bytes(url, settings, param, kind)
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise APIError(
                400,
                f"{param}: remote {kind} URLs are disabled on this server (start it with "
                f"--allow-remote-images); send the {kind} as a base64 data URL",
                param=param,
                code=f"remote_{kind}s_disabled",
            )
        return _remote_bytes(url, settings, param, kind)
    if scheme in ("file", ""):
        if not settings.allow_local_files:
            raise APIError(
                400,
                f"{param}: local files are disabled on this server (start it with --allow-local-files); "
                f"send the {kind} as a base64 data URL",
                param=param,
                code="local_files_disabled",
            )
        return _local_bytes(url, settings, param, kind)
    raise APIError(
        400,
        f"{param}: unsupported URL scheme {scheme!r} (use a data:{kind}/...;base64 URL)",
        param=param,
        code=f"invalid_{kind}_url",
    )


def decode_image(data: bytes, settings: ServeSettings, param: str) -> Image.Image:
    """Decoded RGB image, 413 over the pixel limit, 400 for anything that is not a usable image."""
    try:
        return load_image(data, max_pixels=settings.max_image_pixels, name=param)
    except ImageTooLargeError as err:
        raise APIError(413, str(err), param=param, code="image_too_large") from None
    except ImageDecodeError as err:
        raise APIError(400, str(err), param=param, code="invalid_image") from None
    except Exception:
        log.warning("unexpected error decoding %s", param, exc_info=True)
        raise APIError(
            400, f"{param}: the data is not a readable image", param=param, code="invalid_image"
        ) from None


def image_from_url(url: str, settings: ServeSettings, param: str) -> Image.Image:
    """Fetch (per the switches) and decode one request image."""
    return decode_image(image_bytes(url, settings, param), settings, param)


def decode_video(data: bytes, settings: ServeSettings, param: str, num_frames: int) -> list[Image.Image]:
    """A video's ``num_frames`` uniformly sampled RGB frames (``mm15.video.read_video``).

    413 when a frame is over ``max_image_pixels``, 400 for anything that is not a usable video. The
    error names ``param``, never the temporary file.
    """
    if not data:
        raise APIError(400, f"{param}: the video is empty (0 bytes)", param=param, code="invalid_video")
    handle, name = tempfile.mkstemp(prefix="mm15-video-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        return read_video(
            name,
            num_frames,
            max_pixels=settings.max_image_pixels,
            max_decoded_pixels=settings.max_video_decode_pixels,
        ).frames
    except VideoTooLargeError as err:  # frames over the pixel limit, or too much to decode: 413
        raise APIError(413, f"{param}: {err.reason}", param=param, code="video_too_large") from None
    except VideoError as err:
        raise APIError(
            400, f"{param}: {err.reason}".replace(name, "the video"), param=param, code="invalid_video"
        ) from None
    except Exception:
        log.warning("unexpected error decoding %s", param, exc_info=True)
        raise APIError(
            400, f"{param}: the data is not a readable video", param=param, code="invalid_video"
        ) from None
    finally:
        os.unlink(name)


def video_from_url(url: str, settings: ServeSettings, param: str, num_frames: int) -> list[Image.Image]:
    """Fetch (per the switches) and decode one request video into its sampled frames."""
    return decode_video(image_bytes(url, settings, param, "video"), settings, param, num_frames)
