"""Reading video files for MM1.5-Video: uniform frame sampling and decoding with PyAV.

MM1.5-Video (mm15-spec.md section 6) has no temporal module: a clip becomes ``num_frames`` frames
(24 in MM1.5) sampled uniformly over the whole video whatever its length, and each frame is one
unsplit image of ``tokens_per_tile`` tokens (``ChatEncoder`` plans samples with ``is_video`` set
without splitting, so 24 frames cost 24 x 144 = 3456 image tokens at MM1.5's settings).

**Sampling rule** (``sample_frame_indices``). The ``T`` decoded frames are cut into ``N`` equal
segments and the frame at the centre of each segment is taken::

    index_i = floor((i + 1/2) * T / N)      for i = 0 .. N-1    (exact integer arithmetic)

For ``T >= N`` the indices are strictly increasing and distinct (consecutive ones are at least
``T / N >= 1`` apart), the first is ``floor(T / 2N)`` and the last ``floor(T - T / 2N)``, so the clip's
start and end are covered symmetrically. **Shorter videos** (``T < N``) give every frame once,
``0 .. T-1``: no frame is duplicated to pad the count, because a repeated frame says nothing new and
would make a static clip look longer; the sample simply has fewer images (and fewer image tokens).

**Reading** (``read_video``). Frames are decoded in order from the first video stream (cover art, a
stream FFmpeg marks ``attached_pic`` as in an MP3 or M4A, is not a video stream) and the sampled ones
kept (seeking is not used: it lands on key frames and is inexact for many codecs,
while sequential decoding always gives frame ``k`` as the ``k``-th decoded frame). Decoding stops
after the last sampled frame. The frame count ``T``:

* is the container's count when it declares one (``stream.frames > 0``) that fits the stream's
  duration times its frame rate (a fragmented MP4 declares its first fragment's frames only: such a
  count, under 90% of that product, counts as none);
* is found by decoding and counting every frame first when the container does not (some WebM / MKV
  streams), and the selected frames are then decoded in a second pass;
* is corrected when the declared count is too large (a truncated file): the frames actually decoded
  become ``T``, the indices are recomputed and the missing frames decoded again. A decoding error
  after at least one frame (a file cut inside a frame's data, or damaged from some point on) ends the
  stream there the same way; only a stream of which no frame decodes is an error.

Sampling is by frame index, not by time: for a variable-frame-rate video (a phone or screen
recording) the sampled frames are evenly spaced in frames, and ``VideoClip.timestamps()`` gives their
real times, read from each frame's own timestamp.

Frames are converted to RGB as ``mm15.image`` converts images (``to_rgb``): a frame with an alpha
channel (PNG or QuickTime Animation in MOV, VP9 with alpha, a GIF's transparency) is composited over
white, not shown black where it is transparent.

Rotation metadata (a phone video shot in portrait carries a display matrix) is applied in steps of
90 degrees, so frames come upright, as players show them and as ``mm15.image`` turns photos by their
EXIF orientation; ``VideoClip.width`` and ``height`` are the upright size.

**Time windows.** ``window=(start, end)`` in seconds samples only frames ``round(start * fps) ..
round(end * fps)`` (MVBench's ``start`` / ``end`` bounds): the same rule over that stretch of frames.
**Frame folders.** A folder of frame images (one file per frame, natural name order) is read as a video
of ``FRAME_FOLDER_FPS`` frames per second (MVBench's frame folders), decoding only the sampled files.

**Errors** are ``VideoError`` (a ``ValueError``) naming the file and the reason: a missing file, an
empty (zero-byte) file, a file FFmpeg cannot open or decode (corrupt or not a video), a still image or
a text file (which FFmpeg would read as a one-frame or rendered-text "video"), a file with no video
stream (audio only, or audio with cover art), a stream with no decodable frame, or frames over
``max_pixels`` (the same decompression-bomb guard as ``mm15.image.load_image``).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from mm15.image import DEFAULT_MAX_PIXELS, ImageError, load_image, to_rgb
from mm15.paths import IS_A_DIRECTORY, not_a_file_reason

if TYPE_CHECKING:  # PyAV is imported when a video is read, so importing mm15.video stays cheap
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

# MM1.5-Video's frame count: 24 uniformly sampled frames per clip.
DEFAULT_NUM_FRAMES = 24

# The frame rate of a folder of frame images, which no file states: MVBench's frame folders (TVQA's
# episodes) are extracted at 3 frames per second.
FRAME_FOLDER_FPS = 3.0
FRAME_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})

VideoSource = str | os.PathLike

# FFmpeg demuxers that present something other than a video as a video stream: still images (image2,
# image2pipe and the per-format readers png_pipe, jpeg_pipe, webp_pipe, ..., all ``*_pipe``) and text
# rendered as pictures (tty for .txt / .nfo / ANSI art; bintext's bin, xbin, adf and idf). Animated
# formats (gif, apng) have demuxers of their own and stay videos.
_NOT_VIDEO_DEMUXERS = frozenset({"image2", "image2pipe", "tty", "bin", "xbin", "adf", "idf"})


class VideoError(ValueError):
    """A video could not be used; ``source`` names the file and ``reason`` says why."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its fields (and notes), so it crosses processes (the data worker) as itself.
        return type(self), (self.source, self.reason), self.__dict__


class VideoTooLargeError(VideoError):
    """A video over a size limit: frames over ``max_pixels``, or more decoding than
    ``max_decoded_pixels`` allows (a server answers it with 413 rather than 400)."""


class _DecodeBudget:
    """Pixels left to decode in one ``read_video`` call (every pass counts), or None for no limit."""

    def __init__(self, limit: int | None, source: str) -> None:
        self.limit, self.left, self.source = limit, limit, source

    def check(self, frames: int, width: int, height: int) -> None:
        """Refuse before decoding ``frames`` frames of ``width`` x ``height`` that would not fit."""
        if self.left is not None and frames * width * height > self.left:
            raise VideoTooLargeError(
                self.source,
                f"sampling it needs {frames} frames of {width}x{height} decoded, more than "
                f"max_decoded_pixels={self.limit} allows",
            )

    def spend(self, width: int, height: int) -> None:
        if self.left is not None:
            self.left -= width * height
            if self.left < 0:
                raise VideoTooLargeError(
                    self.source,
                    f"decoding it takes more than max_decoded_pixels={self.limit} "
                    f"(frames of {width}x{height})",
                )


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from a video and where they came from.

    ``frames[k]`` is decoded frame ``indices[k]`` (0-based, in decoding order) of the ``total_frames``
    frames of the video's first video stream. ``fps`` is the stream's average frame rate (None when the
    container does not say). ``counted`` is True when ``total_frames`` was found by decoding (the
    container declared no count, or a wrong one) rather than read from the container. ``times[k]`` is
    frame ``indices[k]``'s own presentation time in seconds from the first frame's (None when a frame
    carries no timestamp).
    """

    path: str
    frames: list[Image.Image]
    indices: list[int]
    total_frames: int
    fps: float | None
    width: int
    height: int
    counted: bool
    times: tuple[float, ...] | None = None

    @property
    def duration(self) -> float | None:
        """Seconds covered by the decoded frames (None without a frame rate)."""
        return self.total_frames / self.fps if self.fps else None

    def timestamps(self) -> list[float] | None:
        """Each sampled frame's time in seconds from the first frame.

        The frames' own timestamps (``times``), which stay right for variable-frame-rate video (phone and
        screen recordings), where ``index / fps`` drifts from the real time; ``index / fps`` only for
        frames without timestamps, and None when there is no frame rate either.
        """
        if self.times is not None:
            return list(self.times)
        return [index / self.fps for index in self.indices] if self.fps else None


def sample_frame_indices(num_total: int, num_frames: int = DEFAULT_NUM_FRAMES) -> list[int]:
    """Indices of the frames to keep: the centres of ``num_frames`` equal segments (module docstring).

    ``num_total < num_frames`` gives every frame, ``0 .. num_total - 1``, without duplicates.
    """
    if isinstance(num_total, bool) or not isinstance(num_total, int) or num_total < 1:
        raise ValueError(f"num_total must be a positive int, got {num_total!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if num_total <= num_frames:
        return list(range(num_total))
    # floor((i + 1/2) * T / N) without floats, so no rounding can merge or shift two indices.
    return [((2 * i + 1) * num_total) // (2 * num_frames) for i in range(num_frames)]


@functools.cache
def _demuxer_whitelist() -> str:
    """FFmpeg's ``format_whitelist`` for opening a video: the container formats videos come in, the
    audio formats (so that an audio file is "no video stream") and the still-image and text demuxers
    (so that those are named as such, ``_video_stream``).

    Without it FFmpeg guesses the format from the content, and some demuxers open other files: a
    43-byte upload beginning "ffconcat version 1.0" made the concat demuxer read any file the server
    could, past ``--allow-local-files`` (HLS and DASH playlists and ffmetadata can do as much).
    """
    import av

    videos = (
        "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,flv,ogg,asf,mxf,gif,apng,"
        "h264,hevc,m4v,yuv4mpegpipe"
    )
    audio = "mp3,wav,aac,flac"
    stills = sorted(n for n in av.formats_available if n.endswith("_pipe")) + sorted(_NOT_VIDEO_DEMUXERS)
    return ",".join([videos, audio, *stills])


def _open(path: Path) -> InputContainer:
    import av

    try:
        return av.open(str(path), mode="r", options={"format_whitelist": _demuxer_whitelist()})
    except (av.FFmpegError, UnicodeDecodeError) as err:
        raise VideoError(str(path), f"not a readable video file ({err})") from None


def _video_stream(container: InputContainer, path: Path) -> VideoStream:
    """The first real video stream: not a still image or text file, not cover art (``VideoError``)."""
    from av.stream import Disposition

    demuxers = container.format.name.split(",")  # e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    if any(name in _NOT_VIDEO_DEMUXERS or name.endswith("_pipe") for name in demuxers):
        raise VideoError(
            str(path), f"not a video: FFmpeg reads it as a still image or text ({container.format.name})"
        )
    # Cover art (an MP3's ID3 picture, an M4A's artwork) is a one-picture "video stream" beside the
    # audio; it is no more a video than a still image is.
    streams = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
    if not streams:
        art = " (only cover art)" if container.streams.video else ""
        raise VideoError(str(path), f"the file has no video stream{art}")
    return streams[0]


# A display matrix's rotation (counterclockwise degrees, as PyAV reports it) -> the transpose showing the
# frame upright, as players do and as mm15.image turns a photo by its EXIF orientation.
_UPRIGHT = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    -180: Image.Transpose.ROTATE_180,
    -90: Image.Transpose.ROTATE_270,
}


def _frame_image(frame: VideoFrame) -> Image.Image:
    """The frame as an upright RGB image: turned by the stream's display matrix (a phone video shot in
    portrait is stored sideways), alpha composited over white as ``mm15.image.to_rgb`` does."""
    if frame.format.has_palette or any(c.is_alpha for c in frame.format.components):
        # rgb24 (to_image's format) drops alpha, leaving transparent pixels' colour (often black).
        image = to_rgb(Image.fromarray(frame.to_ndarray(format="rgba"), mode="RGBA"))
    else:
        image = frame.to_image()
    # Rotations that are not a multiple of 90 degrees (rare, and not shown so by every player) and
    # mirroring stay as stored.
    turn = _UPRIGHT.get(round(frame.rotation))
    return image.transpose(turn) if turn is not None else image


@dataclass
class _Decoded:
    """What one decoding pass found: the kept frames and their times (by index), how many frames
    decoded, and whether the stream ended (rather than decoding stopping after the last wanted frame)."""

    frames: dict[int, Image.Image]
    times: dict[int, float | None]
    count: int
    ended: bool


def _decode(path: Path, wanted: Collection[int], max_pixels: int, budget: _DecodeBudget) -> _Decoded:
    """Decode the first video stream in order, keeping frames whose index is in ``wanted``.

    With ``wanted`` empty the whole stream is decoded and counted; otherwise decoding stops after the
    last wanted frame. A decoding error after at least one frame ends the stream (module docstring).
    Every decoded frame is spent from ``budget``.
    """
    import av

    last = max(wanted) if wanted else None
    out = _Decoded({}, {}, 0, ended=True)
    start: float | None = None  # the first frame's time: kept times are relative to it
    with _open(path) as container:
        stream = _video_stream(container, path)
        try:
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:
                    raise VideoTooLargeError(
                        str(path),
                        f"frames of {frame.width}x{frame.height} pixels exceed max_pixels={max_pixels}",
                    )
                budget.spend(frame.width, frame.height)
                time = frame.time
                if out.count == 0:
                    start = time
                if out.count in wanted:
                    out.frames[out.count] = _frame_image(frame)
                    out.times[out.count] = None if time is None or start is None else time - start
                out.count += 1
                if last is not None and out.count > last:
                    out.ended = False
                    return out
        except av.FFmpegError as err:
            # A truncated or damaged file: FFmpeg fails on the first packet that is cut short or broken.
            # The frames before it are the video there is, as when a truncated file simply ends.
            if out.count == 0:
                raise VideoError(str(path), f"the video stream does not decode ({err})") from None
    return out


# A declared frame count under this share of duration x frame rate is not the video's (see _stream_info).
_DECLARED_COUNT_FLOOR = 0.9


def _stream_info(path: Path) -> tuple[int, float | None, int, int]:
    """(declared frame count or 0, average fps or None, width, height) of the first video stream.

    A fragmented MP4 (``movflags=frag_keyframe``, as streaming encoders and screen recorders write)
    declares the frames of its first fragment only: 1 of 100. A count well under the stream's (else the
    container's) duration times its frame rate is therefore taken as no count, and the frames are
    counted by decoding.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        declared = int(stream.frames or 0)
        if stream.duration and stream.time_base:
            seconds: float | None = float(stream.duration * stream.time_base)
        else:
            seconds = container.duration / 1_000_000 if container.duration else None
        if declared and fps and seconds and declared < _DECLARED_COUNT_FLOOR * seconds * fps:
            declared = 0
        return declared, fps, int(stream.width or 0), int(stream.height or 0)


def check_window(window: tuple[float, float] | None) -> None:
    """``ValueError`` unless ``window`` is None or (start, end) seconds with 0 <= start < end, finite."""
    if window is None:
        return
    start, end = window
    if not all(isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in window):
        raise ValueError(f"window must be two finite numbers of seconds, got {window!r}")
    if start < 0 or end <= start:
        raise ValueError(f"window must satisfy 0 <= start < end (seconds), got {window!r}")


def window_frame_indices(
    num_total: int, num_frames: int, window: tuple[float, float] | None, fps: float | None, source: str
) -> list[int]:
    """``sample_frame_indices`` over the frames of ``window`` (start, end seconds; None: all frames).

    The window's frames are ``round(start * fps) .. round(end * fps)``, both included and cut to the
    video's ``0 .. num_total - 1``, as MVBench bounds its clips; the same centre-of-segment rule then
    samples within them. A window with no frame, or a window on a video without a frame rate, is a
    ``VideoError`` naming ``source``.
    """
    if window is None:
        return sample_frame_indices(num_total, num_frames)
    if not fps:
        raise VideoError(
            source, f"a time window {list(window)} needs the video's frame rate, which it does not give"
        )
    first = max(0, round(window[0] * fps))
    last = min(num_total - 1, round(window[1] * fps))
    if first > last:
        duration = num_total / fps
        raise VideoError(
            source,
            f"the time window {list(window)} s holds no frame of the {duration:.2f} s video ({fps:g} fps)",
        )
    return [first + i for i in sample_frame_indices(last - first + 1, num_frames)]


def _natural_key(name: str) -> list[Any]:
    # "frame10.jpg" after "frame9.jpg": runs of digits compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_frame_folder(
    path: VideoSource,
    num_frames: int = DEFAULT_NUM_FRAMES,
    *,
    fps: float = FRAME_FOLDER_FPS,
    window: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> VideoClip:
    """Sample frames from a folder of frame images (one image file per frame, in natural name order,
    ``00001.jpg``, ``00002.jpg``, ...), as a video of ``fps`` frames per second.

    The same sampling as ``read_video`` (and ``window`` as there). Only the sampled frames are decoded;
    files whose names do not end in an image suffix are ignored. A folder with no image file, or a
    sampled frame that does not decode, is a ``VideoError`` naming the folder (and the file).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if not (isinstance(fps, int | float) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    check_window(window)
    folder = Path(path)
    try:
        names = sorted(
            (
                e.name
                for e in os.scandir(folder)
                if e.is_file() and Path(e.name).suffix.lower() in FRAME_SUFFIXES
            ),
            key=_natural_key,
        )
    except OSError as err:
        raise VideoError(str(folder), f"cannot list the frame folder ({err.strerror or err})") from None
    if not names:
        suffixes = ", ".join(sorted(FRAME_SUFFIXES))
        raise VideoError(str(folder), f"a frame folder with no image file ({suffixes})")
    indices = window_frame_indices(len(names), num_frames, window, fps, str(folder))
    frames = []
    for index in indices:
        try:
            frames.append(load_image(folder / names[index], max_pixels=max_pixels))
        except ImageError as err:
            raise VideoError(str(folder), f"frame {names[index]}: {err.reason}") from None
    return VideoClip(
        path=str(folder),
        frames=frames,
        indices=indices,
        total_frames=len(names),
        fps=float(fps),
        width=frames[0].width,
        height=frames[0].height,
        counted=False,  # the folder's file count, as a container's declared count
    )


def read_video(
    path: VideoSource,
    num_frames: int = DEFAULT_NUM_FRAMES,
    *,
    window: tuple[float, float] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_pixels: int | None = None,
) -> VideoClip:
    """Sample ``num_frames`` frames uniformly from the video at ``path`` (module docstring).

    Returns a ``VideoClip`` whose ``frames`` are RGB ``PIL`` images in time order; fewer than
    ``num_frames`` when the video is shorter. ``window`` = (start, end) in seconds samples only that
    part of the video (``window_frame_indices``). A folder is read as a folder of frame images
    (``read_frame_folder``, at ``FRAME_FOLDER_FPS``). Raises ``VideoError`` for anything unusable.

    ``max_decoded_pixels`` bounds the decoding (frames decoded x their pixels, over every pass): a small
    file can hold thousands of large, still frames that take minutes to decode. Checked before
    decoding when the container declares its frame count, else while decoding; past it,
    ``VideoTooLargeError``.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    check_window(window)
    file = Path(path)
    problem = not_a_file_reason(file)  # never raises (Path.is_dir does on 3.11 for a too-long name)
    if problem == IS_A_DIRECTORY:
        return read_frame_folder(file, num_frames, window=window, max_pixels=max_pixels)
    if problem is not None:
        raise VideoError(str(file), problem)
    if file.stat().st_size == 0:
        raise VideoError(str(file), "empty file (0 bytes)")
    if max_decoded_pixels is not None and (isinstance(max_decoded_pixels, bool) or max_decoded_pixels < 1):
        raise ValueError(f"max_decoded_pixels must be a positive int or None, got {max_decoded_pixels!r}")
    budget = _DecodeBudget(max_decoded_pixels, str(file))
    declared, fps, width, height = _stream_info(file)

    counted = declared == 0
    total = declared
    if counted:  # no count in the container: decode and count, then decode the chosen frames
        total = _decode(file, (), max_pixels, budget).count
        if total == 0:
            raise VideoError(str(file), "the video stream has no decodable frames")
    indices = window_frame_indices(total, num_frames, window, fps, str(file))
    budget.check(max(indices) + 1, width, height)  # decoding runs from the first frame to the last kept
    decoded = _decode(file, set(indices), max_pixels, budget)
    kept, times = decoded.frames, decoded.times
    if decoded.ended and decoded.count < total:
        # The container promised more frames than decode (a truncated file): sample what is there.
        if decoded.count == 0:
            raise VideoError(str(file), "the video stream has no decodable frames")
        total, counted = decoded.count, True
        indices = window_frame_indices(total, num_frames, window, fps, str(file))
        missing = [i for i in indices if i not in kept]
        if missing:
            again = _decode(file, set(missing), max_pixels, budget)
            kept.update(again.frames)
            times.update(again.times)
    frames = [kept[i] for i in indices]
    if frames:  # the upright size (a rotated stream's stored width and height are swapped)
        width, height = frames[0].size
    # A frame without a timestamp (some raw streams) leaves the times unknown: timestamps() falls
    # back to index / fps for all of them rather than mixing the two.
    known = [t for i in indices if (t := times[i]) is not None]
    return VideoClip(
        path=str(file),
        frames=frames,
        indices=indices,
        total_frames=total,
        fps=fps,
        width=width,
        height=height,
        counted=counted,
        times=tuple(known) if len(known) == len(indices) else None,
    )


def write_video(
    path: VideoSource,
    frames: Sequence[Image.Image],
    fps: int = 10,
    codec: str = "mpeg4",
    pix_fmt: str = "yuv420p",
) -> Path:
    """Encode RGB frames to a video file (for tests and synthetic clips). Returns the path.

    ``mpeg4`` is an FFmpeg built-in encoder, so this works with PyAV's bundled FFmpeg everywhere.
    Frame sizes must be even for 4:2:0 chroma (``pix_fmt``; MJPEG needs ``"yuvj420p"``).
    """
    import av

    if not frames:
        raise ValueError("write_video needs at least one frame")
    width, height = frames[0].size
    out = Path(path)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return out
