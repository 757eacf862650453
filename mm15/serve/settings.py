"""The server's limits and security switches, in one frozen record shared by the API and the CLI.

Every limit protects the one process that holds the model: a request over a limit is refused with a
4xx naming the limit, before any expensive work (image bytes are counted before decoding, pixels are
read from the image header, prompt tokens are counted before tiles are built).
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches (defaults are the safe ones: loopback, no remote fetches, no local files)."""

    model_name: str = "mm15"
    api_key: str | None = None
    allow_remote_images: bool = False
    allow_local_files: bool = False
    max_body_bytes: int = 48 * MiB
    max_image_bytes: int = 10 * MiB
    max_image_pixels: int = 25_000_000
    max_images_per_request: int = 4
    # A video (base64 adds a third: 32 MiB of video fits the default 48 MiB body) and its frames:
    # each frame is one unsplit tile, so 24 frames cost 24 x tokens_per_tile prompt tokens.
    max_video_bytes: int = 32 * MiB
    max_video_frames: int = 24
    # Bytes do not bound decoding: 45 kB of MKV held 600 still 4K frames (7 s to decode). Frames decoded
    # x their pixels, every pass; 8e9 is a minute of 1080p at 30 fps decoded twice (a container that
    # declares no frame count is counted first), about 6 s on the project's CPUs.
    max_video_decode_pixels: int = 8_000_000_000
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_stop_sequences: int = 4
    remote_fetch_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        positive = {
            "max_body_bytes": self.max_body_bytes,
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_video_bytes": self.max_video_bytes,
            "max_video_frames": self.max_video_frames,
            "max_video_decode_pixels": self.max_video_decode_pixels,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_tokens_limit": self.max_tokens_limit,
            "default_max_tokens": self.default_max_tokens,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"ServeSettings.{name} must be >= 1, got {value}")
        if self.max_images_per_request < 0:
            raise ValueError(
                f"ServeSettings.max_images_per_request must be >= 0, got {self.max_images_per_request}"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"ServeSettings.default_max_tokens ({self.default_max_tokens}) is over max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        if self.api_key is not None:
            # A key read from a secret file or an environment variable often ends in a newline, which
            # no client can send in its header: the key is what is left without the surrounding space.
            object.__setattr__(self, "api_key", self.api_key.strip())
            if not self.api_key:
                raise ValueError("ServeSettings.api_key must not be empty (use None for no key)")
            if any(ord(c) < 32 or ord(c) == 127 for c in self.api_key):
                raise ValueError(
                    "ServeSettings.api_key must not contain control characters (a client cannot send them)"
                )
