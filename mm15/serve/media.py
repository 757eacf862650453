"""Image URLs of a request -> decoded images, under the server's limits and security switches.

This is the one place where a client's image reference is read. A ``data:image/...;base64,`` URL is
always accepted; ``http(s)://`` URLs only with ``allow_remote_images`` (the server would fetch any
address it is given, including ones on its own network) and ``file://`` URLs or plain paths only with
``allow_local_files`` (the server would read any image file its user can read). Sizes are checked
before work: the base64 length before decoding, the file size before reading, the pixel count from
the image header before decoding pixels (``mm15.image.load_image``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from PIL import Image

from mm15.image import ImageDecodeError, ImageTooLargeError, load_image
from mm15.serve.errors import APIError
from mm15.serve.settings import ServeSettings

log = logging.getLogger("mm15.serve")


def _too_large(param: str, size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"{param}: the image is {size} bytes, over this server's limit of {limit} bytes",
        param=param,
        code="image_too_large",
    )


def _data_url_bytes(url: str, settings: ServeSettings, param: str) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise APIError(
            400, f"{param}: a data URL needs a comma before its data", param=param, code="invalid_image_url"
        )
    media_type, *options = header.split(";")
    if "base64" not in options:
        raise APIError(
            400,
            f"{param}: only base64 data URLs are accepted (data:image/png;base64,...)",
            param=param,
            code="invalid_image_url",
        )
    if media_type and not media_type.lower().startswith("image/"):
        raise APIError(
            400, f"{param}: media type {media_type!r} is not an image", param=param, code="invalid_image_url"
        )
    payload = "".join(payload.split())  # some encoders wrap base64 into lines
    # Base64 carries 3 bytes per 4 characters: refuse an oversize image before decoding it.
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise _too_large(param, len(payload) * 3 // 4, settings.max_image_bytes)
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


def _remote_bytes(url: str, settings: ServeSettings, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mm15-serve"})
    try:
        with _OPENER.open(request, timeout=settings.remote_fetch_timeout_s) as response:
            data = response.read(settings.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise APIError(
            400, f"{param}: could not fetch the image ({err})", param=param, code="image_fetch_failed"
        ) from None
    if len(data) > settings.max_image_bytes:
        raise _too_large(param, len(data), settings.max_image_bytes)
    return data


def _local_bytes(location: str, settings: ServeSettings, param: str) -> bytes:
    path = Path(unquote(urlsplit(location).path) if location.startswith("file:") else location)
    if not path.is_file():
        raise APIError(400, f"{param}: no such file on the server", param=param, code="invalid_image_url")
    size = path.stat().st_size
    if size > settings.max_image_bytes:
        raise _too_large(param, size, settings.max_image_bytes)
    return path.read_bytes()


def image_bytes(url: str, settings: ServeSettings, param: str) -> bytes:
    """The bytes behind an image URL, or an ``APIError`` naming ``param`` and the rule it broke."""
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return _data_url_bytes(url, settings, param)
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise APIError(
                400,
                f"{param}: remote image URLs are disabled on this server (start it with "
                "--allow-remote-images); send the image as a base64 data URL",
                param=param,
                code="remote_images_disabled",
            )
        return _remote_bytes(url, settings, param)
    if scheme in ("file", ""):
        if not settings.allow_local_files:
            raise APIError(
                400,
                f"{param}: local files are disabled on this server (start it with --allow-local-files); "
                "send the image as a base64 data URL",
                param=param,
                code="local_files_disabled",
            )
        return _local_bytes(url, settings, param)
    raise APIError(
        400,
        f"{param}: unsupported URL scheme {scheme!r} (use a data:image/...;base64 URL)",
        param=param,
        code="invalid_image_url",
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
