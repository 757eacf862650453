"""``mm15.serve.media``: a local file a request names is read or refused with a 400, never a 500."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm15.serve.errors import APIError
from mm15.serve.media import image_bytes
from mm15.serve.settings import ServeSettings

ALLOWED = ServeSettings(allow_local_files=True)


@pytest.mark.parametrize("as_url", [True, False])
def test_a_local_name_too_long_for_the_os_is_a_400_naming_why(tmp_path: Path, as_url: bool) -> None:
    """Path.is_file raised OSError (ENAMETOOLONG) on Python 3.11: the server answered 500."""
    long_path = tmp_path / ("a" * 300 + ".png")
    with pytest.raises(APIError, match=r"^p: the file on the server: File name too long$") as refused:
        image_bytes(long_path.as_uri() if as_url else str(long_path), ALLOWED, "p")
    assert (refused.value.status, refused.value.code) == (400, "invalid_image_url")


def test_a_local_path_that_is_not_a_file_is_a_400_saying_what_it_is(tmp_path: Path) -> None:
    for path, why in [(tmp_path, "is a directory, not a file"), (tmp_path / "gone.png", "no such file")]:
        with pytest.raises(APIError, match=f"the file on the server: {why}") as refused:
            image_bytes(path.as_uri(), ALLOWED, "p", kind="video")
        assert (refused.value.status, refused.value.code) == (400, "invalid_video_url")
    (tmp_path / "a.png").write_bytes(b"\x89PNG")
    assert image_bytes(str(tmp_path / "a.png"), ALLOWED, "p") == b"\x89PNG"
