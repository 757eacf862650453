"""MM1.5-Video: frame sampling, reading real video files, video-QA records and the 24-frame token count.

Every video is encoded here with PyAV into the test's temporary folder: each frame a solid colour, so
the colour of a decoded frame says which frame it is.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

from mm15.chat import ChatEncoder
from mm15.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from mm15.data.sources import SourceError
from mm15.data.video_qa import MC_INSTRUCTION, VideoQAReader
from mm15.geometry import ImagePlanConfig
from mm15.model.mm15 import IMAGE_TOKEN
from mm15.video import (
    FRAME_FOLDER_FPS,
    VideoError,
    read_frame_folder,
    read_video,
    sample_frame_indices,
    window_frame_indices,
    write_video,
)

# Ten colours far apart in RGB, so lossy coding cannot turn one into another.
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 255, 0),
    (255, 0, 255),
    (0, 255, 255),
    (0, 0, 0),
    (255, 255, 255),
    (128, 128, 128),
    (255, 128, 0),
)


def which_frame(image: Image.Image) -> int:
    """The index of the colour nearest to the frame's centre pixel."""
    pixel = image.getpixel((image.width // 2, image.height // 2))
    return min(
        range(len(COLORS)), key=lambda k: sum((a - b) ** 2 for a, b in zip(pixel, COLORS[k], strict=True))
    )


def colour_video(path: Path, count: int = 10, codec: str = "mpeg4") -> Path:
    frames = [Image.new("RGB", (64, 48), COLORS[k % len(COLORS)]) for k in range(count)]
    return write_video(path, frames, fps=10, codec=codec)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    colour_video(root / "ten.mp4")
    colour_video(root / "ten.mkv")  # Matroska declares no frame count: decode-and-count path
    colour_video(root / "three.mp4", count=3)
    (root / "empty.mp4").write_bytes(b"")
    (root / "garbage.mp4").write_bytes(os.urandom(4096))
    data = (root / "ten.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return root


# ------------------------------------------------------------------------------------ sampling rule


def test_indices_are_segment_centres() -> None:
    # T = 10, N = 4: segments of 2.5 frames, centres 1.25, 3.75, 6.25, 8.75.
    assert sample_frame_indices(10, 4) == [1, 3, 6, 8]
    assert sample_frame_indices(48, 24) == list(range(1, 48, 2))
    assert sample_frame_indices(24, 24) == list(range(24))
    assert sample_frame_indices(1000, 1) == [500]


@pytest.mark.parametrize("total", [25, 37, 100, 1001, 54_000])
def test_indices_distinct_increasing_and_in_range(total: int) -> None:
    indices = sample_frame_indices(total, 24)
    assert len(indices) == 24
    assert all(b > a for a, b in itertools.pairwise(indices))
    assert indices[0] >= 0 and indices[-1] < total
    # Symmetric about the clip's middle: the first is as far from the start as the last from the end.
    assert abs(indices[0] - (total - 1 - indices[-1])) <= 1


def test_short_videos_give_every_frame_once() -> None:
    assert sample_frame_indices(5, 24) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(1, 24) == [0]


@pytest.mark.parametrize("bad", [(0, 24), (10, 0), (-1, 4), (True, 4), (10, 2.5)])
def test_indices_reject_bad_arguments(bad: tuple) -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(*bad)


# ------------------------------------------------------------------------------------------ reading


def test_read_back_the_sampled_frames(videos: Path) -> None:
    clip = read_video(videos / "ten.mp4", num_frames=4)
    assert clip.indices == [1, 3, 6, 8]
    assert len(clip.frames) == 4
    assert [which_frame(f) for f in clip.frames] == [1, 3, 6, 8]
    assert (clip.total_frames, clip.counted, clip.fps) == (10, False, 10.0)
    assert (clip.width, clip.height) == (64, 48)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in clip.frames)
    assert clip.timestamps() == pytest.approx([0.1, 0.3, 0.6, 0.8])
    assert clip.duration == pytest.approx(1.0)


def test_stream_without_a_frame_count_is_decoded_and_counted(videos: Path) -> None:
    clip = read_video(videos / "ten.mkv", num_frames=4)
    assert clip.counted and clip.total_frames == 10
    assert [which_frame(f) for f in clip.frames] == [1, 3, 6, 8]


def test_shorter_than_n_returns_every_frame_without_duplicates(videos: Path) -> None:
    clip = read_video(videos / "three.mp4")  # the default: MM1.5's 24 frames
    assert clip.indices == [0, 1, 2]
    assert [which_frame(f) for f in clip.frames] == [0, 1, 2]


def test_a_container_that_overstates_its_frames_is_resampled(
    videos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mm15.video as video

    real = video._stream_info
    # As a truncated file would: the header claims 20 frames, 10 decode.
    monkeypatch.setattr(video, "_stream_info", lambda path: (20, *real(path)[1:]))
    clip = read_video(videos / "ten.mp4", num_frames=4)
    assert (clip.total_frames, clip.counted) == (10, True)
    assert [which_frame(f) for f in clip.frames] == [1, 3, 6, 8]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.mp4", "empty file (0 bytes)"),
        ("garbage.mp4", "not a readable video file"),
        ("truncated.mp4", "no video stream"),
        ("missing.mp4", "no such file"),
    ],
)
def test_unusable_files_raise_video_error(videos: Path, name: str, reason: str) -> None:
    with pytest.raises(VideoError, match=re.escape(reason)) as info:
        read_video(videos / name)
    assert name in str(info.value) and isinstance(info.value, ValueError)


def noise_h264(path: Path, count: int = 20) -> Path:
    """An H.264 MP4 of ``count`` 32x32 noise frames, index at the front (``faststart``) as streamed files
    have it, so a cut file still opens and declares every frame. Noise spreads the frames' data evenly."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_until_error(path: Path) -> tuple[list[Image.Image], bool]:
    """Every frame PyAV decodes before its first error, and whether an error came."""
    import av

    frames: list[Image.Image] = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_image())
        except av.FFmpegError:
            return frames, True
    return frames, False


def test_a_truncated_h264_file_is_sampled_over_the_frames_that_decode(tmp_path: Path) -> None:
    """The libx264 decoder fails on the first frame cut short (FFmpegError) instead of ending cleanly as
    MPEG-4 Part 2 does; the frames before it are the clip, as for any truncated file."""
    data = noise_h264(tmp_path / "whole.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 7 // 10])
    raw, failed = decode_until_error(cut)
    assert failed and 4 < len(raw) < 20  # the case under test: an error after some frames decoded
    clip = read_video(cut, num_frames=4)
    assert (clip.total_frames, clip.counted) == (len(raw), True)
    assert clip.indices == sample_frame_indices(len(raw), 4)
    assert [f.tobytes() for f in clip.frames] == [raw[i].tobytes() for i in clip.indices]
    # Cut inside the first frame's data: nothing decodes, which is still an error.
    mdat = data.index(b"mdat")
    cut.write_bytes(data[: mdat + 60])
    assert decode_until_error(cut) == ([], True)
    with pytest.raises(VideoError, match="the video stream does not decode"):
        read_video(cut)


def test_stills_text_and_cover_art_are_not_videos(tmp_path: Path) -> None:
    """FFmpeg reads a PNG or JPEG as a one-frame video, renders a text file (its tty demuxer) and shows
    an MP3's cover art as a video stream; none of them is a video to sample."""
    import av
    import numpy as np

    Image.new("RGB", (64, 48), COLORS[0]).save(tmp_path / "still.png")
    Image.new("RGB", (64, 48), COLORS[0]).save(tmp_path / "still.jpg")
    (tmp_path / "notes.txt").write_text("hello, this is a text file\n" * 20)
    with av.open(str(tmp_path / "plain.mp3"), "w") as container:  # 0.5 s of silence
        stream = container.add_stream("libmp3lame", rate=44100)
        for k in range(20):
            audio = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
            audio.sample_rate, audio.pts = 44100, k * 1152
            for packet in stream.encode(audio):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    # The same MP3 behind an ID3v2.3 tag holding a JPEG cover (an APIC frame), as music files carry it.
    jpeg = (tmp_path / "still.jpg").read_bytes()
    # Text encoding, MIME type, picture type 3 (front cover), an empty description, the picture.
    apic = b"\x00image/jpeg\x00\x03\x00" + jpeg
    frame = b"APIC" + len(apic).to_bytes(4, "big") + b"\x00\x00" + apic
    size = bytes((len(frame) >> shift) & 0x7F for shift in (21, 14, 7, 0))  # ID3's 7-bit "syncsafe" size
    audio = (tmp_path / "plain.mp3").read_bytes()
    (tmp_path / "song.mp3").write_bytes(b"ID3\x03\x00\x00" + size + frame + audio)
    with av.open(str(tmp_path / "song.mp3")) as container:  # the cover is there, as a video stream
        assert [s.type for s in container.streams] == ["audio", "video"]
    for name in ("still.png", "still.jpg", "notes.txt"):
        with pytest.raises(VideoError, match=re.escape(f"{name}: not a video: FFmpeg reads it as a still")):
            read_video(tmp_path / name)
    with pytest.raises(VideoError, match=re.escape("song.mp3: the file has no video stream (only cover")):
        read_video(tmp_path / "song.mp3")
    with pytest.raises(VideoError, match=re.escape("plain.mp3: the file has no video stream")):
        read_video(tmp_path / "plain.mp3")
    # An animated GIF is a video (TGIF-QA clips are GIFs): its demuxer is not an image reader's.
    colours = [Image.new("RGB", (64, 48), COLORS[k]) for k in range(3)]
    colours[0].save(tmp_path / "anim.gif", save_all=True, append_images=colours[1:], duration=100)
    assert [which_frame(f) for f in read_video(tmp_path / "anim.gif").frames] == [0, 1, 2]


def test_variable_frame_rate_timestamps_are_the_frames_own_times(tmp_path: Path) -> None:
    """Five frames 10 ms apart, then five 1 s apart: ``index / average fps`` puts the sampled frames
    at evenly spread times, far from when they are shown."""
    from fractions import Fraction

    import av

    base = Fraction(1, 1000)
    shown = [0, 10, 20, 30, 40, 1040, 2040, 3040, 4040, 5040]  # milliseconds
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = stream.time_base = base
        for k, pts in enumerate(shown):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), COLORS[k]))
            frame.pts, frame.time_base = pts, base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = read_video(path, num_frames=4)
    assert clip.indices == [1, 3, 6, 8]  # still sampled by frame index
    assert [which_frame(f) for f in clip.frames] == [1, 3, 6, 8]
    assert clip.timestamps() == pytest.approx([0.01, 0.03, 2.04, 4.04])
    assert clip.times == pytest.approx((0.01, 0.03, 2.04, 4.04))


def test_transparent_frames_are_composited_over_white_as_images_are(tmp_path: Path) -> None:
    """PNG frames in a MOV keep an alpha channel; converting to RGB straight drops it and shows the
    transparent pixels' colour (black) instead of the white ``mm15.image`` composites onto."""
    import av
    import numpy as np

    from mm15.image import to_rgb

    pixels = np.zeros((48, 64, 4), np.uint8)  # transparent black
    pixels[:20, :20] = (255, 0, 0, 255)  # opaque red
    pixels[30:, 40:] = (0, 0, 255, 128)  # half-transparent blue
    path = tmp_path / "alpha.mov"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgba"
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgba")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = read_video(path)
    assert len(clip.frames) == 3
    expected = to_rgb(Image.fromarray(pixels, mode="RGBA"))
    for frame in clip.frames:
        assert frame.mode == "RGB" and frame.tobytes() == expected.tobytes()  # PNG is lossless
    first = clip.frames[0]
    assert first.getpixel((60, 10)) == (255, 255, 255)
    assert first.getpixel((5, 5)) == (255, 0, 0)
    assert first.getpixel((50, 40)) == expected.getpixel((50, 40)) != (0, 0, 128)


def test_demuxers_that_open_other_files_are_refused(videos: Path, tmp_path: Path) -> None:
    """FFmpeg's concat demuxer (and HLS playlists) read the files a text names: an upload of 43 bytes
    would make the server decode any video it can read."""
    (tmp_path / "private.mp4").write_bytes((videos / "ten.mp4").read_bytes())
    playlist = tmp_path / "upload"
    playlist.write_text("ffconcat version 1.0\nfile private.mp4\n")  # relative: concat's "safe" names
    with pytest.raises(VideoError, match="upload: not a readable video file"):
        read_video(playlist)
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nprivate.mp4\n#EXT-X-ENDLIST\n")
    with pytest.raises(VideoError, match="upload: not a"):
        read_video(playlist)


def test_a_fragmented_mp4_is_sampled_over_all_its_fragments(tmp_path: Path) -> None:
    """A fragmented MP4 declares the frames of its first fragment only (here 5 of 30)."""
    import av
    import numpy as np

    path = tmp_path / "fragmented.mp4"
    with av.open(str(path), "w", options={"movflags": "frag_keyframe"}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"g": "5"}
        for k in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), COLORS[k % 10], np.uint8), format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert 0 < container.streams.video[0].frames < 30
    clip = read_video(path, 4)
    assert clip.total_frames == 30 and clip.counted
    assert clip.indices == sample_frame_indices(30, 4)
    assert [which_frame(f) for f in clip.frames] == [k % 10 for k in clip.indices]


def test_a_portrait_phone_video_comes_upright(tmp_path: Path) -> None:
    """A phone stores a portrait clip sideways with a display matrix saying "turn 90 degrees clockwise"
    (a = 0, b = 1, c = -1, d = 0 in the track header); its frames are read as it is shown."""
    import struct

    stored = Image.new("RGB", (64, 48), COLORS[2])
    stored.paste(COLORS[0], (0, 0, 16, 16))  # a red square in the stored frame's top-left corner
    write_video(tmp_path / "stored.mp4", [stored] * 3, fps=10)
    data = bytearray((tmp_path / "stored.mp4").read_bytes())
    matrix = data.index(b"tkhd") + 4 + 40  # version-0 header: the matrix follows 40 bytes of fields
    values = (0, 0x10000, 0, 0xFFFF0000, 0, 0, 48 << 16, 0, 0x40000000)  # fixed-point; tx = height
    data[matrix : matrix + 36] = struct.pack(">9I", *values)
    (tmp_path / "portrait.mp4").write_bytes(bytes(data))
    clip = read_video(tmp_path / "portrait.mp4", 2)
    assert (clip.width, clip.height) == (48, 64) and clip.frames[0].size == (48, 64)
    # Turned clockwise, the stored top-left corner is the top-right one.
    assert which_frame(clip.frames[0].crop((40, 0, 48, 8)).resize((8, 8))) == 0
    assert which_frame(clip.frames[0].crop((0, 0, 8, 8)).resize((8, 8))) == 2
    assert read_video(tmp_path / "stored.mp4", 2).frames[0].size == (64, 48)


def test_a_name_over_the_length_limit_is_a_video_error(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="File name too long"):
        read_video(tmp_path / ("a" * 300 + ".mp4"))


def test_a_folder_without_frame_images_is_not_a_video(tmp_path: Path) -> None:
    folder = tmp_path / "clip.mp4"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a frame")
    with pytest.raises(VideoError, match=re.escape("clip.mp4: a frame folder with no image file")):
        read_video(folder)


# ------------------------------------------------------------------ time windows and frame folders


def test_window_indices_follow_mvbench_bounds() -> None:
    # 10 fps, 100 frames, 2.0-4.0 s: frames round(20) .. round(40), both included, 21 frames.
    assert window_frame_indices(100, 4, (2.0, 4.0), 10.0, "v") == [
        20 + i for i in sample_frame_indices(21, 4)
    ]
    assert window_frame_indices(100, 4, None, 10.0, "v") == sample_frame_indices(100, 4)
    # Past the end: cut to the last frame; a window after the video holds none.
    assert window_frame_indices(30, 24, (2.0, 99.0), 10.0, "v") == list(range(20, 30))
    with pytest.raises(
        VideoError, match=r"v: the time window \[5\.0, 6\.0\] s holds no frame of the 3\.00 s"
    ):
        window_frame_indices(30, 4, (5.0, 6.0), 10.0, "v")
    with pytest.raises(VideoError, match="needs the video's frame rate"):
        window_frame_indices(30, 4, (0.0, 1.0), None, "v")


@pytest.mark.parametrize("bad", [(1.0, 1.0), (-1.0, 2.0), (2.0, 1.0), (0.0, float("nan")), (True, 2.0)])
def test_bad_windows_are_refused(videos: Path, bad: tuple) -> None:
    with pytest.raises(ValueError, match="window must"):
        read_video(videos / "ten.mp4", 4, window=bad)


def test_read_video_samples_within_the_window(videos: Path) -> None:
    # ten.mp4: 10 frames at 10 fps, frame k coloured COLORS[k]. 0.3-0.6 s is frames 3 .. 6.
    for name in ("ten.mp4", "ten.mkv"):  # declared count and decode-and-count
        clip = read_video(videos / name, 2, window=(0.3, 0.6))
        assert clip.indices == [4, 6]  # centres of two segments of frames 3..6: 3 + floor(1), 3 + floor(3)
        assert [which_frame(f) for f in clip.frames] == [4, 6]
    assert read_video(videos / "ten.mp4", 24, window=(0.3, 0.6)).indices == [3, 4, 5, 6]


def test_a_folder_of_frame_images_is_a_video(tmp_path: Path) -> None:
    folder = tmp_path / "episode"
    folder.mkdir()
    for k in range(12):  # natural order: 2 before 10, as TVQA's numbered frames
        Image.new("RGB", (32, 24), COLORS[k % len(COLORS)]).save(folder / f"{k + 1}.png")
    (folder / "info.txt").write_text("ignored")
    clip = read_video(folder, 3)
    assert clip.total_frames == 12 and clip.fps == FRAME_FOLDER_FPS
    assert clip.indices == sample_frame_indices(12, 3)
    assert [which_frame(f) for f in clip.frames] == [k % len(COLORS) for k in clip.indices]
    # At 3 frames per second, 1.0-2.0 s is frames 3 .. 6.
    assert read_frame_folder(folder, 24, window=(1.0, 2.0)).indices == [3, 4, 5, 6]
    assert read_frame_folder(folder, 24, fps=6.0, window=(1.0, 2.0)).indices == list(range(6, 12))
    (folder / "5.png").write_bytes(b"broken")
    with pytest.raises(VideoError, match=r"episode: frame 5\.png: "):
        read_video(folder, 12)


# ----------------------------------------------------------------------- frames as unsplit images


@pytest.fixture(scope="module")
def tokenizer():
    from mm15.model.llm import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def video_sample(frames: int) -> Sample:
    return Sample(
        id="v",
        turns=[Turn("user", IMAGE_PLACEHOLDER * frames + "\nWhat moves?"), Turn("assistant", "the ball")],
        category="video",
        source="test",
        images=["unused.png"] * frames,
        is_video=True,
    )


def test_24_frames_cost_24_unsplit_tiles_of_144_tokens(tokenizer) -> None:
    encoder = ChatEncoder(tokenizer, ImagePlanConfig(), max_length=8192)  # MM1.5: 672 px, 144 tokens
    encoded = encoder.encode(video_sample(24), [(720, 1280)] * 24)
    assert len(encoded.plans) == 24
    assert all(not p.split and p.num_tiles == 1 and p.grid == (1, 1) for p in encoded.plans)
    assert encoded.num_image_tokens == 24 * 144 == 3456
    assert [p.tiles[0].marker for p in encoded.plans[:2]] == ["(0, 0, 0)", "(1, 0, 0)"]
    assert encoded.input_ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 3456


def test_a_short_clip_is_not_split_either(tokenizer) -> None:
    # Two frames would be split as two images (< 3 images split); as video frames they are not.
    encoder = ChatEncoder(tokenizer, ImagePlanConfig(), max_length=8192)
    encoded = encoder.encode(video_sample(2), [(720, 1280)] * 2)
    assert [p.num_tiles for p in encoded.plans] == [1, 1]
    assert encoded.num_image_tokens == 2 * 144


# ------------------------------------------------------------------------------- video-QA records


def write_records(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_reader_three_record_shapes(videos: Path, tmp_path: Path) -> None:
    records = [
        {
            "id": "conv",
            "video": "ten.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat colours appear?"},
                {"from": "gpt", "value": "Many."},
            ],
        },
        {
            "video": "ten.mkv",
            "question": "Which comes first?",
            "candidates": ["red", "green"],
            "answer": "red",
        },
        {"video": "three.mp4", "question": "How many frames?", "answer": 3},
    ]
    annotations = write_records(tmp_path / "qa.jsonl", records)
    samples = list(VideoQAReader(annotations, video_root=videos, num_frames=4))
    conv, mc, open_ended = samples
    for sample in samples:
        sample.validate()
        assert sample.is_video and sample.category == "video" and sample.source == "qa"
    assert conv.id == "conv" and len(conv.images) == 4
    assert conv.turns[0].content == IMAGE_PLACEHOLDER * 4 + "\nWhat colours appear?"
    assert [which_frame(f) for f in conv.images] == [1, 3, 6, 8]
    assert conv.truth["frame_indices"] == [1, 3, 6, 8] and conv.truth["task"] == "conversation"
    assert mc.truth["task"] == "multiple-choice" and mc.truth["answer_letter"] == "A"
    assert (
        mc.turns[0].content
        == IMAGE_PLACEHOLDER * 4 + f"\nWhich comes first?\nOptions:\n(A) red\n(B) green\n{MC_INSTRUCTION}"
    )
    assert mc.turns[1].content == "A"
    assert open_ended.truth["answer"] == "3" and len(open_ended.images) == 3
    assert open_ended.truth["total_frames"] == 3


def test_reader_counts_or_raises_bad_records(videos: Path, tmp_path: Path) -> None:
    good = {"video": "ten.mp4", "question": "q?", "answer": "a"}
    bad = [
        {"video": "nowhere.mp4", "question": "q?", "answer": "a"},  # missing_video
        {"video": "garbage.mp4", "question": "q?", "answer": "a"},  # bad_video
        {"video": "empty.mp4", "question": "q?", "answer": "a"},  # bad_video
        {"video": "ten.mp4", "question": "q?", "candidates": ["x", "y"], "answer": "z"},  # bad_record
        {"video": "ten.mp4", "question": "q?"},  # bad_record
        {"question": "q?", "answer": "a"},  # bad_record (no video)
        {"video": "ten.mp4", "conversations": [{"from": "robot", "value": "hi"}]},  # unknown_role
        {
            "video": "ten.mp4",
            "conversations": [{"from": "human", "value": "<video><video> q"}, {"from": "gpt", "value": "a"}],
        },  # image_count
    ]
    annotations = write_records(tmp_path / "bad.jsonl", [good, *bad])
    (tmp_path / "bad.jsonl").write_text((tmp_path / "bad.jsonl").read_text() + "{not json\n")
    lenient = VideoQAReader(annotations, video_root=videos, num_frames=2, strict=False)
    assert len(list(lenient)) == 1
    assert lenient.skipped.as_dict() == {
        "missing_video": 1,
        "bad_video": 2,
        "bad_record": 3,
        "unknown_role": 1,
        "image_count": 1,
        "bad_json": 1,
    }
    with pytest.raises(SourceError, match="missing_video") as info:
        list(VideoQAReader(annotations, video_root=videos, num_frames=2))
    assert info.value.location == "line 2"


def test_reader_takes_mvbench_bounds_and_frame_folders(videos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(6):
        Image.new("RGB", (32, 24), COLORS[k]).save(folder / f"{k + 1:05d}.jpg", quality=95)
    mc = {"question": "Which colour?", "candidates": ["red", "green"], "answer": "green"}
    records = [
        {"video": str(videos / "ten.mp4"), **mc, "start": 0.3, "end": 0.6},
        {"video": "frames", **mc},
        {"video": str(videos / "ten.mp4"), **mc, "start": 0.3},  # bad_record: end missing
        {"video": str(videos / "ten.mp4"), **mc, "start": 0.6, "end": 0.3},  # bad_record
        {"video": str(videos / "ten.mp4"), **mc, "start": 5.0, "end": 6.0},  # bad_video: after the end
    ]
    reader = VideoQAReader(write_records(tmp_path / "mv.jsonl", records), num_frames=2, strict=False)
    bounded, folder_clip = list(reader)
    assert bounded.truth["frame_indices"] == [4, 6] and bounded.truth["window"] == [0.3, 0.6]
    assert [which_frame(f) for f in bounded.images] == [4, 6]
    assert folder_clip.truth["frame_indices"] == [1, 4] and "window" not in folder_clip.truth
    assert [which_frame(f) for f in folder_clip.images] == [1, 4]
    assert reader.skipped.as_dict() == {"bad_record": 2, "bad_video": 1}


def test_a_lone_surrogate_is_a_bad_record_on_every_path(videos: Path, tmp_path: Path) -> None:
    """``"\\ud83d"`` (half an emoji) parses as JSON but makes the tokenizer raise a TypeError in
    training; iteration counted it as a bad record while ``sample`` and ``sample_at`` let it through."""
    good = {"id": "good", "video": "ten.mp4", "question": "q?", "answer": "a"}
    annotations = tmp_path / "sur.jsonl"
    bad_line = '{"id": "s", "video": "ten.mp4", "question": "What is \\ud83d here?", "answer": "a"}'
    annotations.write_text(bad_line + "\n" + json.dumps(good) + "\n")
    message = re.escape("line 1 (id 's'): bad_record: the record['question'] is not valid Unicode")
    strict = VideoQAReader(annotations, video_root=videos, num_frames=2)
    with pytest.raises(SourceError, match=message):
        list(strict)
    with pytest.raises(SourceError, match=message):
        strict.sample(*strict.records()[0])
    with pytest.raises(SourceError, match=message):
        strict.sample_at(0)
    lenient = VideoQAReader(annotations, video_root=videos, num_frames=2, strict=False)
    with pytest.raises(SourceError, match=message):  # training skips and counts it (TrainStream)
        lenient.sample_at(0)
    assert lenient.sample_at(1).id == "good"
    assert [s.id for s in lenient] == ["good"] and lenient.skipped.as_dict() == {"bad_record": 1}


def test_default_ids_are_the_same_on_every_path_and_unique_across_files(videos: Path, tmp_path: Path) -> None:
    """A record without an id is ``{file stem}-{index in its file}``, as ``LlavaReader`` names it, whether
    it is iterated, taken by ``sample_at`` or by ``sample`` (which evaluation calls with the index in
    ``records()``); files sharing a stem are told apart by their folder."""
    from mm15.data.sources import LlavaReader

    record = {
        "video": str(videos / "three.mp4"),
        "conversations": [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "Colours."}],
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_records(tmp_path / "a" / "train.jsonl", [record, {**record, "id": 7}])
    (tmp_path / "a" / "train.jsonl").write_text(first.read_text() + "\n" + json.dumps(record) + "\n")
    second = write_records(tmp_path / "b" / "train.jsonl", [record])
    other = write_records(tmp_path / "other.jsonl", [record, record])
    reader = VideoQAReader([first, second, other], num_frames=2)
    expected = ["a/train-0", "7", "a/train-2", "b/train-0", "other-0", "other-1"]
    assert [s.id for s in reader] == expected
    assert [reader.sample_at(k).id for k in range(6)] == expected
    fresh = VideoQAReader([first, second, other], num_frames=2)
    assert [fresh.sample(*entry, index).id for index, entry in enumerate(fresh.records())] == expected
    # Without the listing (records() not called) the record's place in its file is read again.
    assert VideoQAReader([first, second], num_frames=2).sample(second, "line 1", record).id == "b/train-0"
    # One file, or files with distinct stems: exactly LlavaReader's ids.
    assert [s.id for s in VideoQAReader(other, num_frames=2)] == [s.id for s in LlavaReader(other)]
    assert [s.id for s in VideoQAReader([first], num_frames=2)] == [s.id for s in LlavaReader(first)]


def test_video_source_kind_streams_samples_by_index(videos: Path, tmp_path: Path) -> None:
    from mm15.train.data import SampleSource, UnusableRecord

    records = [
        {"video": str(videos / "ten.mp4"), "question": "q?", "answer": "ten"},
        {"video": str(videos / "missing.mp4"), "question": "q?", "answer": "lost"},
        {"video": str(videos / "three.mp4"), "question": "q?", "answer": "three"},
    ]
    spec = f"video:{write_records(tmp_path / 'train.jsonl', records)}"
    source = SampleSource(spec)

    def answers(source: SampleSource, n: int) -> list[str]:
        out = []
        for _ in range(n):
            try:
                out.append(source.next().truth["answer"])
            except UnusableRecord as unusable:  # the training stream skips and counts it
                out.append(unusable.error.reason)
        return out

    # The unusable record raises each time it comes round (the stream counts a skip per draw).
    assert answers(source, 5) == ["ten", "missing_video", "three", "ten", "missing_video"]
    first = SampleSource(spec).next()
    assert first.is_video and len(first.images) == 10
    source.seek(2)  # resuming goes straight to the record, decoding nothing before it
    assert source.next().truth["answer"] == "three"
    rank1 = SampleSource(spec, rank=1, world_size=2)  # samples 1, 3, 5, ... of the same stream
    assert answers(rank1, 2) == ["missing_video", "ten"]


def test_synthetic_clips_are_video_samples() -> None:
    from mm15.data.synth import generate

    sample = generate("video", 0, split="eval")
    assert sample.is_video and sample.category == "video" and 8 <= len(sample.images) <= 24
    assert sample.truth["answer"] == sample.turns[-1].content


# ------------------------------------------------------------------------------------ video tasks


def run_task(name: str, predict, **options) -> tuple[dict[str, float], list]:
    """The task's aggregate for predictions made by ``predict(item)``."""
    from mm15.eval.tasks import resolve_task_specs

    spec = f"{name}:" + ",".join(f"{k}={v}" for k, v in options.items())
    ((_, task, resolved),) = resolve_task_specs([spec])
    items = list(task.items(resolved))
    predictions = [task.parse(predict(item), item) for item in items]
    scores = [task.score(p, item) for p, item in zip(predictions, items, strict=True)]
    return task.aggregate(predictions, items, scores), items


@pytest.fixture(scope="module")
def qa_file(videos: Path) -> Path:
    records = [
        {
            "id": "mc1",
            "video": "ten.mp4",
            "question": "First colour?",
            "candidates": ["blue", "red"],
            "answer": 1,
        },
        {
            "id": "mc2",
            "video": "ten.mkv",
            "question": "Last colour?",
            "candidates": ["orange", "red"],
            "answer": 0,
        },
        {"id": "oe1", "video": "three.mp4", "question": "What colour comes first?", "answer": "red"},
        {"id": "oe2", "video": "ten.mp4", "question": "How many frames?", "answer": "ten"},
    ]
    return write_records(videos / "qa.jsonl", records)


def test_held_out_synthetic_video_task() -> None:
    result, items = run_task("synth-video", lambda item: item.answers[0], size=2)
    assert result["score"] == 100.0 and len(items) == 2
    assert all(item.meta["is_video"] and "/eval/" in item.id for item in items)
    assert run_task("synth-video", lambda item: "sideways", size=2)[0]["score"] == 0.0


def test_multiple_choice_video_task(qa_file: Path) -> None:
    result, items = run_task("video-mc", lambda item: item.answers[0], path=qa_file, frames=4)
    assert [item.answers for item in items] == [("B",), ("A",)]
    assert result["score"] == 100.0
    assert all(item.meta["is_video"] and len(item.images) == 4 for item in items)
    # Letters are read by the canonical extraction: "(B) red" and "The answer is B." both count.
    assert (
        run_task("video-mc", lambda item: f"The answer is {item.answers[0]}.", path=qa_file)[0]["score"]
        == 100
    )
    wrong = {"A": "B", "B": "A"}
    assert run_task("video-mc", lambda item: wrong[item.answers[0]], path=qa_file)[0]["score"] == 0.0


def test_open_ended_video_task_labels_the_offline_fallback_judge(qa_file: Path) -> None:
    from mm15.eval.tasks import get_task
    from mm15.eval.variant_tasks import FALLBACK_JUDGE_LABEL

    assert FALLBACK_JUDGE_LABEL == "exact-match (offline fallback, not a GPT judge)"
    assert FALLBACK_JUDGE_LABEL in get_task("video-qa").metric
    result, items = run_task("video-qa", lambda item: f"{item.answers[0].upper()}.", path=qa_file)
    assert len(items) == 2 and result["score"] == 100.0
    assert result[f"accuracy [{FALLBACK_JUDGE_LABEL}]"] == 100.0
    assert run_task("video-qa", lambda item: "purple", path=qa_file)[0]["score"] == 0.0


def test_open_ended_video_task_with_a_plugged_in_judge(qa_file: Path) -> None:
    from mm15.eval.tasks import TaskError
    from mm15.eval.variant_tasks import LLMJudge, register_judge

    requests: list[list[dict[str, str]]] = []

    def complete(messages: list[dict[str, str]]) -> str:  # a stand-in for a chat client
        requests.append(messages)
        right = "Correct Answer: red\nPredicted Answer: red\n" in messages[-1]["content"]
        return "{'pred': 'yes', 'score': 4}" if right else "{'pred': 'no', 'score': 1}"

    register_judge("fake-gpt", LLMJudge(complete, "fake-gpt (test)"), replace=True)
    result, _ = run_task("video-qa", lambda item: "red", path=qa_file, judge="fake-gpt")
    assert result["score"] == 50.0 and result["accuracy [fake-gpt (test)]"] == 50.0
    assert result["mean score 0-5 [fake-gpt (test)]"] == 2.5
    assert result["unparsed verdicts [fake-gpt (test)]"] == 0
    assert len(requests) == 2  # verdicts are cached: aggregation did not ask again
    with pytest.raises(TaskError, match="unknown judge"):
        run_task("video-qa", str, path=qa_file, judge="nobody")


# ActivityNet-QA's judge messages as Video-ChatGPT (evaluate_activitynet_qa.py) and lmms-eval
# (tasks/activitynetqa/utils.py) send them, character for character (eval-metrics.md 1.10).
ACTIVITYNET_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. Your task is to compare the predicted answer with the correct answer and "
    "determine if they match meaningfully. Here's how you can accomplish the task:------##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n- Consider "
    "synonyms or paraphrases as valid matches.\n- Evaluate the correctness of the prediction compared "
    "to the answer."
)
ACTIVITYNET_USER = (
    "Please evaluate the following video-based question-answer pair:\n\nQuestion: {q}\nCorrect Answer: "
    "{a}\nPredicted Answer: {pred}\n\nProvide your evaluation only as a yes/no and score where the "
    "score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. Please "
    "generate the response in the form of a Python dictionary string with keys 'pred' and 'score', "
    "where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not "
    "STRING.DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary "
    "string. For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
)


def test_llm_judge_sends_activitynet_messages_and_aggregates_yes_over_yes_and_no() -> None:
    from mm15.eval import metrics
    from mm15.eval.tasks import TaskItem
    from mm15.eval.variant_tasks import LLMJudge, judged_aggregate, judged_score, register_judge

    replies = {
        "p1": "{'pred': 'yes', 'score': 5}",
        "p2": "{'pred': 'no', 'score': 1}",
        "p3": "Sure! {'pred': 'Yes', 'score': 3}",
        "p4": "{'pred': 'maybe', 'score': 3}",  # neither yes nor no: not in the accuracy
    }
    sent: list[list[dict[str, str]]] = []

    def complete(messages: list[dict[str, str]]) -> str:
        sent.append(messages)
        return replies[messages[1]["content"].split("Predicted Answer: ")[1].split("\n")[0]]

    register_judge("fake-activitynet", LLMJudge(complete, "fake (test)"), replace=True)
    question = "What is {answer} doing?"  # braces in the question are not template fields
    meta = {"judge": "fake-activitynet", "question_text": question}
    items = [TaskItem(id=str(k), question="q", answers=("a cat",), meta=meta) for k in range(4)]
    predictions = list(replies)
    scores = [judged_score(p, item) for p, item in zip(predictions, items, strict=True)]
    assert scores == [1.0, 0.0, 1.0, 0.0]
    result = judged_aggregate(predictions, items, scores)
    reference = metrics.judge_aggregate([metrics.parse_judge_reply(replies[p]) for p in predictions])
    assert result["score"] == pytest.approx(200 / 3) == reference["accuracy"]  # 2 yes / (2 yes + 1 no)
    assert result["accuracy [fake (test)]"] == result["score"]
    assert result["unparsed verdicts [fake (test)]"] == 1
    assert result["mean score 0-5 [fake (test)]"] == reference["score"] == 3.0
    assert [m["role"] for m in sent[0]] == ["system", "user"]
    assert sent[0][0]["content"] == ACTIVITYNET_SYSTEM
    filled = ACTIVITYNET_USER.replace("{q}", question).replace("{a}", "a cat").replace("{pred}", "p1")
    assert sent[0][1]["content"] == filled
    # The offline fallback goes through the same aggregate; it gives no 0-5 score.
    plain = [TaskItem(id="x", question="q", answers=("a cat",), meta=dict(meta, judge="exact-match"))]
    result = judged_aggregate(["A cat."], plain, [judged_score("A cat.", plain[0])])
    assert result["score"] == 100.0 and not any(key.startswith("mean score") for key in result)


def test_video_tasks_count_the_records_they_leave_out(videos: Path) -> None:
    from mm15.eval.tasks import resolve_task_specs, skipped_counts

    conversation = [
        {"from": "human", "value": "<video>\nWhat happens?"},
        {"from": "gpt", "value": "Colours."},
    ]
    records = [
        {"video": "ten.mp4", "question": "First colour?", "candidates": ["blue", "red"], "answer": 1},
        {"video": "ten.mp4", "question": "Last colour?", "candidates": ["orange", "red"], "answer": 0},
        {"video": "three.mp4", "question": "What colour comes first?", "answer": "red"},
        {"video": "ten.mp4", "conversations": conversation},
    ]
    path = write_records(videos / "mixed.jsonl", records)
    ((_, mc, options),) = resolve_task_specs(f"video-mc:path={path},frames=2")
    listed = mc.items(options)
    assert len(listed) == 2 and skipped_counts(listed) == {"conversation": 1, "open_ended": 1}
    ((_, qa, options),) = resolve_task_specs(f"video-qa:path={path},frames=2")
    listed = qa.items(options)
    assert len(listed) == 1 and skipped_counts(listed) == {"conversation": 1, "multiple_choice": 2}
    # A file of one kind skips nothing.
    ((_, mc, options),) = resolve_task_specs(
        f"video-mc:path={write_records(videos / 'mc.jsonl', records[:2])}"
    )
    assert skipped_counts(mc.items(options)) == {}


# ------------------------------------------------------------------------------------------ recipe

ROOT = Path(__file__).resolve().parent.parent


def test_video_recipe_loads_and_fine_tunes_the_tiny_sft_model() -> None:
    import yaml

    from mm15.train.config import RecipeConfig, load_recipe

    recipe = load_recipe(ROOT / "recipes" / "video.yaml")
    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml")
    assert RecipeConfig.from_dict(yaml.safe_load(yaml.safe_dump(recipe.to_dict()))) == recipe
    (stage,) = recipe.stages
    # The parent is where `mm15 train recipes/tiny.yaml` writes its SFT model.
    assert Path(stage.parent) == tiny.run_dir / tiny.stages[-1].name / "final"
    assert recipe.model == tiny.model
    assert stage.data.resolve_sources() == {"video": "synth:video"}
    assert not recipe.image_plan("sft").split


def test_train_parent_option_repoints_the_recipe(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mm15.cli import app

    missing = tmp_path / "no-model-here"
    result = CliRunner().invoke(
        app,
        ["train", str(ROOT / "recipes/video.yaml"), "--parent", str(missing), "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 2  # found before anything trains: a usage error
    assert f"its parent '{missing}' has no model" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["train", str(ROOT / "recipes/tiny.yaml"), "--parent", str(missing)])
    assert result.exit_code == 2 and "no stage of 'tiny' starts from a model directory" in result.output


def test_video_recipe_trains_two_steps(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset

    torch.manual_seed(0)
    MM15Model.build(preset("tiny")).save_pretrained(tmp_path / "parent")
    out = tmp_path / "run"
    args = ["train", "recipes/video.yaml", "--parent", str(tmp_path / "parent"), "--max-steps", "2"]
    subprocess.run([sys.executable, "-m", "mm15.cli", *args, "--out", str(out)], cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (out / "sft" / "final").is_dir()


def test_synthetic_clips_exported_as_real_video_files(tmp_path: Path) -> None:
    from mm15.data.video_qa import write_synthetic_video_qa

    annotations = write_synthetic_video_qa(tmp_path / "mc", 3)
    records = [json.loads(line) for line in annotations.read_text().splitlines()]
    assert all(r["answer"] in r["candidates"] for r in records)
    samples = list(VideoQAReader(annotations))
    # Every frame of the 8-24 frame clips comes back (fewer than 24), in order.
    assert all(s.truth["frame_indices"] == list(range(s.truth["total_frames"])) for s in samples)
    assert all(s.images[0].size == (224, 224) for s in samples)
    result, items = run_task("video-mc", lambda item: item.answers[0], path=annotations)
    assert len(items) == 3 and result["score"] == 100.0
    open_ended = write_synthetic_video_qa(tmp_path / "oe", 2, multiple_choice=False)
    result, items = run_task("video-qa", lambda item: item.answers[0], path=open_ended)
    assert len(items) == 2 and result["score"] == 100.0
