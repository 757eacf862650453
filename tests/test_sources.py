"""Data sources: LLaVA JSON/JSONL, WebDataset shards, interleaved and text-only readers, error policy."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mm15.data.sample import Region, Sample, Turn
from mm15.data.sources import (
    InterleavedReader,
    LlavaReader,
    ShardReader,
    SourceError,
    TextReader,
    write_llava,
    write_shards,
)
from mm15.data.video_qa import VideoQAReader
from mm15.image import load_image
from mm15.video import write_video


def _pixels(seed: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "originals"
    folder.mkdir()
    jpg, png = folder / "photo.jpg", folder / "shot.png"
    _pixels(1).save(jpg, quality=85)
    _pixels(2, (10, 30)).save(png)
    return {"jpg": jpg, "png": png}


@pytest.fixture
def samples(image_files: dict[str, Path]) -> list[Sample]:
    """Single- and multi-image, PIL and file images, boxes and points, system turns, truth, video."""
    return [
        Sample(
            id="ground-1",
            turns=[
                Turn("system", "Answer briefly."),
                Turn("user", "<image>\nWhat is in <region0>? Point at <region1>."),
                Turn("assistant", "A cat at <region0>; here <region1>."),
            ],
            category="refer-ground",
            source="synth-ground",
            images=[image_files["jpg"]],
            regions=[Region(0, box=(1.5, 2.0, 20.0, 15.25)), Region(0, point=(3.0, 4.0))],
            truth={"objects": [{"label": "cat", "box": [1.5, 2.0, 20.0, 15.25]}], "note": "ünïcode"},
        ),
        Sample(
            id="multi-2",
            turns=[Turn("user", "Compare <image> and <image>; see <region0>."), Turn("assistant", "Same.")],
            category="multi-image",
            source="pairs",
            images=[_pixels(3), image_files["png"]],
            regions=[Region(1, box=(0.0, 0.0, 10.0, 30.0))],
        ),
        Sample(
            id="rgba-3",
            turns=[Turn("user", "<image> Read it."), Turn("assistant", "Text.")],
            category="text-rich",
            source="docs",
            images=[_pixels(4, mode="RGBA")],
        ),
        Sample(
            id="video-4",
            turns=[Turn("user", "<image><image><image> What happens?"), Turn("assistant", "Motion.")],
            category="video",
            source="clips",
            images=[_pixels(5), _pixels(6), image_files["jpg"].read_bytes()],
            is_video=True,
        ),
        Sample(
            id="text-5",
            turns=[Turn("user", "2+2?"), Turn("assistant", "4")],
            category="text-only",
            source="chat",
        ),
    ]


def _image_bytes(ref: object) -> bytes:
    if isinstance(ref, bytes):
        return ref
    return Path(ref).read_bytes()  # type: ignore[arg-type]


def _assert_same(read: list[Sample], written: list[Sample]) -> None:
    """Everything but the images compares equal; images have identical bytes, or pixels for PIL ones."""
    assert [s.id for s in read] == [s.id for s in written]
    for got, want in zip(read, written, strict=True):
        assert got.turns == want.turns
        assert got.regions == want.regions
        assert (got.category, got.source, got.is_video, got.truth) == (
            want.category,
            want.source,
            want.is_video,
            want.truth,
        )
        assert len(got.images) == len(want.images)
        for got_image, want_image in zip(got.images, want.images, strict=True):
            data = _image_bytes(got_image)
            if isinstance(want_image, Image.Image):
                decoded = Image.open(io.BytesIO(data))
                assert decoded.format == "PNG" and decoded.mode == want_image.mode
                assert np.array_equal(np.asarray(decoded), np.asarray(want_image))
            else:
                assert data == _image_bytes(want_image)
        got.validate()


# ---------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
def test_llava_round_trip_loses_nothing(tmp_path: Path, samples: list[Sample], name: str) -> None:
    path = write_llava(samples, tmp_path / "out" / name, tmp_path / "out" / "images")
    reader = LlavaReader(path, tmp_path / "out" / "images")
    read = list(reader)
    _assert_same(read, samples)
    assert all(isinstance(image, Path) for s in read for image in s.images)
    assert reader.skipped.total == 0
    assert not list((tmp_path / "out").glob(".*"))  # no temp file left


def test_llava_reads_genuine_records(tmp_path: Path, image_files: dict[str, Path]) -> None:
    records = [
        {
            "id": 17,
            "image": "originals/photo.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."},
                {"from": "gpt", "value": "A photo."},
                {"from": "human", "value": "More?"},
                {"from": "gpt", "value": "No."},
            ],
        },
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    path = tmp_path / "llava_v1_5.json"
    path.write_text(json.dumps(records))
    first, second = LlavaReader(path).__iter__()  # image_root defaults to the file's folder
    assert first.id == "17" and first.category == "general" and first.source == "llava_v1_5"
    assert [t.role for t in first.turns] == ["user", "assistant", "user", "assistant"]
    assert first.images == [tmp_path / "originals/photo.jpg"]
    assert second.images == [] and second.regions == []
    read = list(LlavaReader(path, category="general", source="llava"))
    assert {s.source for s in read} == {"llava"}


def test_shard_round_trip_loses_nothing(tmp_path: Path, samples: list[Sample]) -> None:
    paths = write_shards(samples, tmp_path / "shards", samples_per_shard=2)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted((tmp_path / "shards").iterdir()) == paths  # no temp files
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.json", "000000000.0.jpg"]
    assert "000000001.0.png" in names and "000000001.1.png" in names
    reader = ShardReader(tmp_path / "shards")
    read = list(reader)
    assert all(isinstance(image, bytes) for s in read for image in s.images)
    _assert_same(read, samples)
    assert reader.skipped.total == 0
    # A list of shard paths reads the same; identical input gives byte-identical shards.
    assert [s.id for s in ShardReader(paths)] == [s.id for s in samples]
    again = write_shards(samples, tmp_path / "again", samples_per_shard=2)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_a_pil_image_with_an_exif_orientation_is_written_upright(tmp_path: Path) -> None:
    """PNG keeps no EXIF: the shard once held the stored pixels, and the image came back sideways."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "o.jpg", exif=exif)
    opened = Image.open(tmp_path / "o.jpg")
    sample = Sample("o", [Turn("user", "<image>"), Turn("assistant", "a")], "general", "s", images=[opened])
    write_shards([sample], tmp_path / "shards")
    (read,) = list(ShardReader(tmp_path / "shards"))
    assert load_image(read.images[0]).size == load_image(opened).size == (20, 40)


def test_shards_of_llava_samples_keep_the_file_bytes(tmp_path: Path, samples: list[Sample]) -> None:
    path = write_llava(samples, tmp_path / "d.jsonl")
    from_llava = list(LlavaReader(path))
    write_shards(from_llava, tmp_path / "shards", samples_per_shard=10)
    _assert_same(list(ShardReader(tmp_path / "shards")), samples)


# ---------------------------------------------------------------------------------------------------------
# Splitting shards across ranks and workers


def _text_sample(i: int) -> Sample:
    return Sample(f"s{i}", [Turn("user", f"q{i}"), Turn("assistant", f"a{i}")], "text-only", "t")


@pytest.mark.parametrize("seed", [None, 3])
def test_rank_worker_split_covers_every_shard_once(tmp_path: Path, seed: int | None) -> None:
    shards = write_shards((_text_sample(i) for i in range(23)), tmp_path, samples_per_shard=2)
    assert len(shards) == 12
    world_size, num_workers = 2, 3
    for epoch in (0, 1):
        seen_shards: list[Path] = []
        seen_ids: list[str] = []
        for rank in range(world_size):
            for worker in range(num_workers):
                reader = ShardReader(tmp_path, rank, world_size, worker, num_workers, shuffle_seed=seed)
                reader.set_epoch(epoch)
                mine = reader.assigned_shards()
                assert len(mine) == 2  # 12 shards over 6 workers
                seen_shards += mine
                seen_ids += [s.id for s in reader]
        assert sorted(seen_shards) == shards
        assert sorted(seen_ids) == sorted(f"s{i}" for i in range(23))
    if seed is None:  # unshuffled: shard i goes to global worker i % 6
        assert ShardReader(tmp_path, 1, 2, 2, 3).assigned_shards() == [shards[5], shards[11]]


def test_worker_taken_from_dataloader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = write_shards((_text_sample(i) for i in range(4)), tmp_path, samples_per_shard=1)

    class Info:
        id, num_workers = 1, 2

    monkeypatch.setattr("mm15.data.sources.get_worker_info", lambda: Info())
    assert ShardReader(tmp_path, worker=None, num_workers=None).assigned_shards() == [shards[1], shards[3]]
    with pytest.raises(ValueError, match="with 2 workers; pass worker=None"):
        ShardReader(tmp_path).assigned_shards()  # fixed worker 0 of 1 in every DataLoader worker


def test_fewer_shards_than_workers_raises_or_warns(tmp_path: Path) -> None:
    write_shards((_text_sample(i) for i in range(3)), tmp_path, samples_per_shard=1)
    with pytest.raises(ValueError, match="3 shards for 4 workers"):
        list(ShardReader(tmp_path, rank=1, world_size=2, worker=1, num_workers=2))
    reader = ShardReader(tmp_path, rank=1, world_size=2, worker=1, num_workers=2, allow_idle_workers=True)
    with pytest.warns(RuntimeWarning, match="1 workers would get no data"):
        assert list(reader) == []


def test_bad_reader_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no shards"):
        ShardReader(tmp_path)
    write_shards([_text_sample(0)], tmp_path)
    with pytest.raises(ValueError, match="rank"):
        ShardReader(tmp_path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="worker"):
        ShardReader(tmp_path, worker=3, num_workers=3)
    with pytest.raises(FileNotFoundError):
        ShardReader([tmp_path / "nope.tar"])


# ---------------------------------------------------------------------------------------------------------
# Malformed LLaVA records: strict raises, lenient counts

ANSWER = {"from": "gpt", "value": "hello"}
GOOD = {"id": "good", "image": "a.png", "conversations": [{"from": "human", "value": "<image> hi"}, ANSWER]}


def _record(**changes: object) -> dict[str, object]:
    record = {"id": "bad", **{k: v for k, v in GOOD.items() if k != "id"}}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not None}


MALFORMED = [
    ("missing_image", _record(image="nope.png")),
    (
        "missing_image",
        _record(
            image=["a.png", "gone.jpg"], conversations=[{"from": "human", "value": "<image><image>"}, ANSWER]
        ),
    ),
    ("bad_region", _record(regions=[{"image": 0, "box": [10, 0, 5, 4]}])),  # x1 > x2
    ("bad_region", _record(regions=[{"image": 0, "box": [0, 8, 5, 4]}])),  # negative height
    ("bad_region", _record(regions=[{"image": 0, "box": [0, 0, math.nan, 4]}])),
    ("bad_region", _record(regions=[{"image": 0, "point": [-1, 4]}])),
    ("bad_region", _record(regions=[{"image": 1, "point": [1, 4]}])),  # only one image
    ("bad_region", _record(regions=[{"image": 0, "box": [0, 0, 1, 1], "point": [0, 0]}])),
    ("bad_region", _record(regions=[{"image": 0, "box": [0, 0, 1]}])),
    ("bad_region", _record(conversations=[{"from": "human", "value": "<image> <region0>"}, ANSWER])),
    ("unknown_role", _record(conversations=[{"from": "robot", "value": "<image>"}])),
    ("image_count", _record(conversations=[{"from": "human", "value": "no placeholder"}, ANSWER])),
    ("image_count", _record(conversations=[{"from": "human", "value": "<image><image>"}, ANSWER])),
    ("bad_conversations", _record(conversations="<image> hi")),
    ("bad_conversations", _record(conversations=[])),
    ("bad_conversations", _record(conversations=[{"from": "human", "value": 3}, ANSWER])),
    ("bad_conversations", _record(conversations=[{"from": "human", "value": "<image> no answer"}])),
    ("bad_category", _record(category="poetry")),
    ("bad_record", _record(image=7)),
    ("bad_record", _record(id=["x"])),
    ("bad_record", _record(truth=[1])),
    # Half of a surrogate pair (an emoji cut in two): json.loads accepts it, UTF-8 cannot hold it.
    ("bad_record", _record(conversations=[{"from": "human", "value": "<image> x \ud83d"}, ANSWER])),
    ("bad_record", _record(truth={"\udc00": 1})),
]


def _write_llava_file(folder: Path, records: list[object], suffix: str) -> Path:
    _pixels(0).save(folder / "a.png")
    path = folder / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize(("reason", "record"), MALFORMED)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_malformed_llava_record(tmp_path: Path, reason: str, record: dict[str, object], suffix: str) -> None:
    path = _write_llava_file(tmp_path, [GOOD, record, GOOD], suffix)
    with pytest.raises(SourceError) as info:
        list(LlavaReader(path))
    assert info.value.reason == reason and info.value.path == path
    location = "line 2" if suffix == ".jsonl" else "record 1"
    assert str(info.value).startswith(f"{path}: {location}")
    if isinstance(record.get("id"), str):
        assert "(id 'bad')" in str(info.value)
    reader = LlavaReader(path, strict=False)
    assert [s.id for s in reader] == ["good", "good"]
    assert reader.skipped.as_dict() == {reason: 1}
    assert reader.skipped.examples[reason][0].startswith(f"{path}: {location}")


# Found only with check_images=True, from the image's header (a.png is 24 x 16 pixels).
CHECKED_MALFORMED = [
    ("bad_image", _record(image="notes.png")),
    ("bad_region", _record(regions=[{"image": 0, "box": [0, 0, 25, 16]}])),  # 1 px past the right edge
    ("bad_region", _record(regions=[{"image": 0, "point": [3, 17]}])),  # below the bottom edge
    (
        "bad_region",
        _record(regions=[{"image": 0, "box": [0.1, 0.2, 0.5, 0.9]}, {"image": 0, "box": [0, 0, 900, 9]}]),
    ),
    # Normalised (0-1) coordinates stay inside any image; they used to be packed as a box near (0, 0).
    ("bad_region", _record(regions=[{"image": 0, "box": [0.12, 0.25, 0.58, 0.9]}])),
    ("bad_region", _record(regions=[{"image": 0, "point": [0.5, 1]}])),
]


@pytest.mark.parametrize(("reason", "record"), CHECKED_MALFORMED)
def test_check_images_refuses_non_images_and_regions_outside_the_image(
    tmp_path: Path, reason: str, record: dict[str, object]
) -> None:
    path = _write_llava_file(tmp_path, [GOOD, record], ".jsonl")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SourceError) as info:
        list(LlavaReader(path, check_images=True))
    assert info.value.reason == reason and str(info.value).startswith(f"{path}: line 2 (id 'bad'): {reason}")
    if reason == "bad_region":
        assert "(24x16 pixels)" in str(info.value)
    # Without the check the record passes (the problem would be met when the image is decoded).
    assert [s.id for s in LlavaReader(path)] == ["good", "bad"]
    lenient = LlavaReader(path, strict=False, check_images=True)
    assert [s.id for s in lenient] == ["good"] and lenient.skipped.as_dict() == {reason: 1}


def test_check_images_takes_regions_in_the_upright_frame(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 24 x 16, shown rotated: 16 wide and 24 high
    _pixels(1).save(tmp_path / "r.jpg", exif=exif)
    edge = _record(id="edge", image="r.jpg", regions=[{"image": 0, "box": [0, 0, 16, 24]}])
    stored_frame = _record(image="r.jpg", regions=[{"image": 0, "box": [0, 0, 24, 16]}])
    path = _write_llava_file(tmp_path, [edge, stored_frame], ".jsonl")
    reader = LlavaReader(path, strict=False, check_images=True)
    assert [s.id for s in reader] == ["edge"] and reader.skipped.as_dict() == {"bad_region": 1}
    assert "(16x24 pixels)" in reader.skipped.examples["bad_region"][0]


def test_normalised_regions_are_told_by_their_values_on_images_over_4_pixels(tmp_path: Path) -> None:
    _pixels(3, size=(100, 80)).save(tmp_path / "big.png")
    _pixels(4, size=(4, 9)).save(tmp_path / "thin.png")  # 4 px wide: a fraction of a pixel is plausible
    boxes = {
        "normalised": ("big.png", [0.12, 0.25, 0.58, 0.9]),
        "corner-pixel": ("big.png", [0, 0, 1, 1]),  # whole numbers: a pixel box, kept
        "one-px": ("big.png", [0.0, 0.0, 1.0, 1.0]),  # floats, but whole
        "past-1": ("big.png", [0.5, 0.5, 1.5, 1.5]),  # not all in [0, 1]: pixels
        "thin": ("thin.png", [0.1, 0.2, 0.5, 0.9]),
    }
    records = [
        _record(id=name, image=image, regions=[{"image": 0, "box": box}])
        for name, (image, box) in boxes.items()
    ]
    path = _write_llava_file(tmp_path, records, ".jsonl")
    reader = LlavaReader(path, strict=False, check_images=True)
    assert [s.id for s in reader] == ["corner-pixel", "one-px", "past-1", "thin"]
    assert reader.skipped.as_dict() == {"bad_region": 1}
    message = reader.skipped.examples["bad_region"][0]
    assert "(id 'normalised')" in message and "(100x80 pixels): normalised coordinates?" in message
    assert "regions are in pixels of the original image" in message
    assert len(list(LlavaReader(path))) == 5  # only the image's size tells, so only check_images


def test_check_images_in_interleaved_documents(tmp_path: Path) -> None:
    _pixels(2).save(tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("not an image")
    path = tmp_path / "docs.jsonl"
    docs = [{"texts": ["x", None], "images": [None, name]} for name in ("a.png", "notes.png")]
    path.write_text("\n".join(json.dumps(d) for d in docs))
    reader = InterleavedReader(path, strict=False, check_images=True)
    assert [s.id for s in reader] == ["docs-0"] and reader.skipped.as_dict() == {"bad_image": 1}
    assert len(list(InterleavedReader(path))) == 2


def test_null_fields_are_absent_fields(tmp_path: Path) -> None:
    """Columnar exports write every field of their schema, null where a record has none. Some nulls were
    read as absent (id, image, regions), others refused, one with a wrong message ('both image and
    images given'); now every optional field's null is its default."""
    question = {"from": "human", "value": "<image> <region0> <region1>"}
    regions = [{"image": None, "box": [1, 2, 3, 4], "point": None}, {"box": None, "point": [5, 6]}]
    nulls = {k: None for k in ("images", "category", "source", "truth", "is_video")}
    full = {"id": "full", "image": "a.png", "conversations": [question, ANSWER], "regions": regions, **nulls}
    no_id = {**GOOD, "id": None, "regions": None}
    path = _write_llava_file(tmp_path, [full, no_id], ".jsonl")
    first, second = LlavaReader(path, category="math")
    assert first.regions == [Region(0, box=(1, 2, 3, 4)), Region(0, point=(5, 6))]
    assert (first.category, first.source, first.truth, first.is_video) == ("math", "data", {}, False)
    assert second.id == "data-1" and second.regions == []
    # A required field's null is a missing field, with the same message (and no made-up id).
    missing = [{**GOOD, "conversations": None}, {**GOOD, "id": None, "image": "a.png", "conversations": None}]
    path = _write_llava_file(tmp_path, missing, ".jsonl")
    reader = LlavaReader(path, strict=False)
    assert list(reader) == [] and reader.skipped.as_dict() == {"bad_conversations": 2}
    first_error, second_error = reader.skipped.examples["bad_conversations"]
    assert first_error.endswith("(id 'good'): bad_conversations: 'conversations' must be a non-empty list")
    assert second_error == f"{path}: line 2: bad_conversations: 'conversations' must be a non-empty list"
    # The other readers take nulls the same way.
    chat = tmp_path / "chat.jsonl"
    records = [
        {"messages": None, "prompt": "p", "response": "r", "system": None, "text": None, "category": None},
        {"messages": None, "prompt": None, "response": None, "text": "t", "source": None, "truth": None},
    ]
    chat.write_text("\n".join(json.dumps(r) for r in records))
    qa, text = TextReader(chat)
    assert qa.turns == [Turn("user", "p"), Turn("assistant", "r")] and qa.category == "text-only"
    assert text.turns == [Turn("assistant", "t")] and text.source == "chat"
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        json.dumps({"texts": ["x", None], "images": [None, "a.png"], "source": None, "truth": None})
    )
    (doc,) = InterleavedReader(docs)
    assert doc.source == "docs" and doc.images == [tmp_path / "a.png"]
    meta = _meta(["k.0.png"], regions=None, truth=None, is_video=None, id=None)
    (sample,) = ShardReader(_tar(tmp_path / "s.tar", [("k.json", meta), ("k.0.png", _png())]))
    assert (sample.id, sample.regions, sample.truth, sample.is_video) == ("k", [], {}, False)


def test_lenient_counts_accumulate_per_reason_and_reset_per_pass(tmp_path: Path) -> None:
    records = [GOOD, "not an object", _record(image="x.png"), _record(image="y.png"), GOOD]
    path = _write_llava_file(tmp_path, records, ".jsonl")
    with path.open("a") as f:
        f.write("{not json\n\n")
    reader = LlavaReader(path, strict=False)
    for _ in range(2):
        assert len(list(reader)) == 2
        assert reader.skipped.as_dict() == {"bad_record": 1, "missing_image": 2, "bad_json": 1}
        assert reader.skipped.total == 4 and reader.skipped["unknown_role"] == 0
    with pytest.raises(SourceError, match="line 2: bad_record"):
        list(LlavaReader(path))


def test_a_damaged_json_array_keeps_the_records_before_the_damage(tmp_path: Path) -> None:
    """A cut download: strict stops at the damaged record; lenient keeps the records before it and counts
    the rest of the file as one bad_json (nothing after a syntax error can be trusted to start a record)."""
    path = _write_llava_file(tmp_path, [GOOD, GOOD, GOOD], ".json")
    text = path.read_text()
    path.write_text(text[: text.rindex("{") + 10])  # the third record cut short
    with pytest.raises(SourceError) as caught:
        list(LlavaReader(path))
    assert caught.value.location == "record 2" and caught.value.reason == "bad_json"
    assert "invalid JSON" in str(caught.value) and "the rest of the file is not read" in str(caught.value)
    lenient = LlavaReader(path, strict=False)
    assert len(list(lenient)) == 2 and lenient.skipped.as_dict() == {"bad_json": 1}


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf\n{line}\n{line}\n",  # a BOM, then a blank line
        b"\xef\xbb\xbf\r\n\n{line}\r\n{line}\r\n",
        b"\xef\xbb\xbf  \n{line}\n\n{line}",
        b"\xef\xbb\xbf{line}\n{line}\n",
        b"\xef\xbb\xbf",  # only a BOM: an empty file
        b"\xef\xbb\xbf\n",
    ],
)
def test_a_utf8_bom_starts_a_jsonl_file_before_any_blank_line(tmp_path: Path, data: bytes) -> None:
    _pixels(0).save(tmp_path / "a.png")
    path = tmp_path / "bom.jsonl"
    path.write_bytes(data.replace(b"{line}", json.dumps(GOOD).encode()))
    assert [s.id for s in LlavaReader(path)] == ["good"] * data.count(b"{line}")


def test_unusable_files_raise_even_when_lenient(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("<html>")
    with pytest.raises(SourceError, match="not a JSON file"):
        list(LlavaReader(broken, strict=False))
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    with pytest.raises(SourceError, match="expected a JSON array"):
        list(LlavaReader(obj, strict=False))
    with pytest.raises(FileNotFoundError):
        LlavaReader(tmp_path / "missing.jsonl", strict=False)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    records=st.lists(JSON_VALUES, max_size=6),
    indent=st.sampled_from([None, 0, 2]),
    chunk=st.integers(1, 9),
    cut=st.integers(0, 10**6),
    escaped=st.booleans(),
)
def test_a_json_array_streams_as_json_loads_reads_it(
    tmp_path_factory: pytest.TempPathFactory,
    records: list,
    indent: int | None,
    chunk: int,
    cut: int,
    escaped: bool,
) -> None:
    """Chunks of a few bytes put every boundary inside records, and inside multi-byte characters when
    the text is written unescaped; a cut file must still fail."""
    import mm15.data.sources as sources

    path = tmp_path_factory.mktemp("json") / "a.json"
    text = json.dumps(records, indent=indent, ensure_ascii=escaped)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which only an escape can write
        data = json.dumps(records, indent=indent).encode()
    old, sources._JSON_CHUNK = sources._JSON_CHUNK, chunk
    try:
        path.write_bytes(data)
        assert list(sources._json_array(path)) == records
        cut_text = data.decode()[
            : cut % len(data.decode())
        ]  # every proper prefix of an array is invalid JSON
        path.write_text(cut_text, encoding="utf-8")
        with pytest.raises(SourceError):
            list(sources._json_array(path))
    finally:
        sources._JSON_CHUNK = old


@pytest.mark.parametrize(
    ("text", "location", "message"),
    [
        ("", "file", "expected a JSON array at character 0, found the end of the file"),
        ("  {}", "file", "expected a JSON array, got an object"),
        ("12", "file", "expected a JSON array, got a number"),
        ("x", "file", "expected a JSON array at character 0, found 'x'"),
        ('[{"a": 1},]', "record 1", "Expecting value at character 10"),
        ('[{"a": 1} {"b": 2}]', "record 1", "expected ',' or ']' after the record at character 10"),
        ('[{"a": 1}, {"b": }]', "record 1", "Expecting value at character 17"),
        ('[{"a": 1}] []', "record 1", "expected the end of the file after the array at character 11"),
        ("[1, 2", "record 2", "expected ',' or ']' after the record at character 5, found the end"),
    ],
)
def test_a_bad_json_array_names_the_record_and_character(
    tmp_path: Path, text: str, location: str, message: str
) -> None:
    from mm15.data.sources import _json_array

    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SourceError) as caught:
        list(_json_array(path))
    assert caught.value.location == location and message in str(caught.value), str(caught.value)


def test_a_json_array_is_read_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first record arrives after one chunk of text is read, not the whole file (a 1 GB LLaVA file
    parsed whole holds several GB of Python objects); a UTF-8 BOM is accepted and bad UTF-8 is named."""
    import mm15.data.sources as sources

    monkeypatch.setattr(sources, "_JSON_CHUNK", 4096)
    path = tmp_path / "big.json"
    record = {"id": "r", "conversations": [{"from": "gpt", "value": "x" * 200}]}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([record] * 5000).encode())
    with path.open("rb") as probe:
        size = len(probe.read())
    records = sources._json_array(path)
    assert next(records) == record
    handle = records.gi_frame.f_locals["f"]  # the generator's open file
    assert handle.tell() < size // 20, (handle.tell(), size)
    assert sum(1 for _ in records) == 4999
    path.write_bytes(b'[{"a": "\xff"}]')
    with pytest.raises(SourceError, match="not UTF-8"):
        list(sources._json_array(path))


def test_invalid_utf8_costs_only_the_record_it_is_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray Latin-1 byte once discarded the whole chunk of text it was read with: the valid records
    before it were lost, and in a small file even a lenient reader failed on the file."""
    import mm15.data.sources as sources

    monkeypatch.setattr(sources, "_JSON_CHUNK", 4096)
    records = [{"id": f"r{i}", "text": "é" * 50} for i in range(200)]  # two-byte characters
    data = json.dumps(records, ensure_ascii=False).encode()
    bad = data.index(b'"r150"') + 2
    path = tmp_path / "big.json"
    path.write_bytes(data[:bad] + b"\xe9" + data[bad + 1 :])  # a Latin-1 e-acute instead of "1"
    read = []
    with pytest.raises(SourceError) as caught:
        for record in sources._json_array(path):
            read.append(record)
    assert [r["id"] for r in read] == [f"r{i}" for i in range(150)]
    assert caught.value.location == "record 150" and "not UTF-8 at character" in str(caught.value)
    offset = int(str(caught.value).split("not UTF-8 at character ")[1].split()[0])
    assert offset == len(data[:bad].decode())  # characters, as the other messages count them
    # A small file (one chunk): a lenient reader keeps the record before the bad byte.
    small = tmp_path / "small.json"
    _pixels(0).save(tmp_path / "a.png")
    text = json.dumps([GOOD, {**GOOD, "id": "bad"}, GOOD]).encode()
    small.write_bytes(text.replace(b'"bad"', b'"b\xe9d"'))
    reader = LlavaReader(small, strict=False)
    assert [s.id for s in reader] == ["good"] and reader.skipped.as_dict() == {"bad_json": 1}


# ---------------------------------------------------------------------------------------------------------
# Corrupt shards


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _meta(images: list[str], **changes: object) -> bytes:
    meta = {
        "id": "m",
        "turns": [
            {"role": "user", "content": "<image>" * len(images)},
            {"role": "assistant", "content": "a"},
        ],
        "category": "general",
        "source": "s",
        "images": images,
        **changes,
    }
    return json.dumps(meta).encode()


def _png() -> bytes:
    buffer = io.BytesIO()
    _pixels(0).save(buffer, format="PNG")
    return buffer.getvalue()


SHARD_DEFECTS = [
    ("bad_json", [("k.json", b"{oops")]),
    ("bad_member", [("k.0.png", _png())]),  # no .json
    ("bad_member", [("k.json", _meta(["k.0.png"]))]),  # listed image missing
    ("bad_member", [("k.json", _meta([])), ("k.txt", b"stray")]),  # unlisted member
    ("bad_member", [("k.json", _meta([])), ("k.json", _meta([]))]),  # duplicate
    ("unknown_role", [("k.json", _meta([], turns=[{"role": "gpt4", "content": "x"}]))]),
    (
        "image_count",
        [("k.json", _meta(["k.0.png"], turns=[{"role": "assistant", "content": "x"}])), ("k.0.png", _png())],
    ),
    # What the JSON readers refuse, the shard reader refuses too: no assistant turn (nothing to learn)...
    ("bad_conversations", [("k.json", _meta([], turns=[{"role": "user", "content": "x"}]))]),
    # ... and half a surrogate pair, which json.dumps writes as an escape and the tokenizer cannot take.
    ("bad_record", [("k.json", _meta([], turns=[{"role": "assistant", "content": "hi \ud83d"}]))]),
    ("bad_region", [("k.json", _meta(["k.0.png"], regions=[{"box": [5, 5, 1, 1]}])), ("k.0.png", _png())]),
    ("bad_record", [("k.json", b"[1, 2]")]),
]


@pytest.mark.parametrize(("reason", "members"), SHARD_DEFECTS)
def test_corrupt_shard_member(tmp_path: Path, reason: str, members: list[tuple[str, bytes]]) -> None:
    good = [("a.json", _meta(["a.0.png"])), ("a.0.png", _png())]
    good_after = [("z.json", _meta([], id="z"))]
    shard = _tar(tmp_path / "s.tar", good + members + good_after)
    with pytest.raises(SourceError) as info:
        list(ShardReader(shard))
    assert info.value.reason == reason and info.value.path == shard
    reader = ShardReader(shard, strict=False)
    assert [s.id for s in reader] == ["m", "z"]
    assert reader.skipped.as_dict() == {reason: 1}


# Each text sample is one 512-byte header + one data block; sample k's header starts at byte 1024 * k.
@pytest.mark.parametrize(
    ("cut", "before"),
    [
        (2048, ["s0", "s1"]),  # at a member boundary: tarfile alone would see a clean end and lose s2
        (2048 + 100, ["s0", "s1"]),  # inside a header: also a quiet end for tarfile
        (2048 + 600, ["s0", "s1"]),  # inside data
        (3072, ["s0", "s1", "s2"]),  # members complete, no end-of-archive block: still reported
        (1000, ["s0"]),  # only the padding after s0's .json is cut
        (600, []),  # s0's .json is cut
    ],
)
def test_truncated_shard(tmp_path: Path, cut: int, before: list[str]) -> None:
    shards = write_shards((_text_sample(i) for i in range(6)), tmp_path, samples_per_shard=3)
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:cut])
    with pytest.raises(SourceError, match="bad_shard"):
        list(ShardReader(tmp_path))
    reader = ShardReader(tmp_path, strict=False)
    assert [s.id for s in reader] == [*before, "s3", "s4", "s5"]  # the next shard is still read
    assert reader.skipped.as_dict() == {"bad_shard": 1}


def test_a_zero_block_inside_a_shard_is_damage_not_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tarfile takes any zero block for the end of the archive: a zero-filled hole (a crash, an interrupted
    preallocated download) used to end the shard quietly, losing every sample after it."""
    monkeypatch.setattr("mm15.data.sources._TAIL_CHUNK", 700)  # the tail is read a chunk at a time
    (shard,) = write_shards((_text_sample(i) for i in range(5)), tmp_path / "holed", samples_per_shard=5)
    data = bytearray(shard.read_bytes())
    assert data[2048 : 2048 + 14] == b"000000002.json"  # sample 2's header (see test_truncated_shard)
    data[2048 : 2048 + 512] = bytes(512)
    shard.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"bad_shard.*data follows at byte 2560") as info:
        list(ShardReader(shard))
    assert info.value.location == "after member 000000001.json"
    reader = ShardReader(shard, strict=False)
    assert [s.id for s in reader] == ["s0", "s1"] and reader.skipped.as_dict() == {"bad_shard": 1}
    assert str(shard) in reader.skipped.examples["bad_shard"][0]
    # Two archives end to end: the second's samples would be dropped the same way.
    first, second = (write_shards([_text_sample(i)], tmp_path / f"part{i}")[0] for i in (0, 1))
    joined = tmp_path / "joined.tar"
    joined.write_bytes(first.read_bytes() + second.read_bytes())
    reader = ShardReader(joined, strict=False)
    assert [s.id for s in reader] == ["s0"] and reader.skipped.as_dict() == {"bad_shard": 1}
    # Real padding is zeros of any length: tarfile's 10240-byte records, or larger ones.
    padded = tmp_path / "padded.tar"
    padded.write_bytes(first.read_bytes() + bytes(3 * 10240 + 512))
    assert len(first.read_bytes()) == 10240
    assert [s.id for s in ShardReader(first)] == [s.id for s in ShardReader(padded)] == ["s0"]
    data = bytearray(padded.read_bytes())
    data[-1] = 1  # one byte past several chunks of zeros
    padded.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=f"data follows at byte {len(data) - 1}"):
        list(ShardReader(padded))


# ---------------------------------------------------------------------------------------------------------
# Atomic writes


def test_an_interrupted_write_leaves_no_shard(tmp_path: Path) -> None:
    """All or nothing: the shards finished before the failure used to stay, and read as a complete data
    set (and made a rerun stop at 'already holds'). Now they are staged and deleted with the rest."""

    def stream():
        for i in range(5):
            yield _text_sample(i)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(stream(), tmp_path, samples_per_shard=2)
    assert list(tmp_path.iterdir()) == []  # no shard, no staged or partial file
    with pytest.raises(RuntimeError, match="source died"):
        write_shards(stream(), tmp_path / "new", samples_per_shard=2)
    assert not (tmp_path / "new").exists()
    written = write_shards((_text_sample(i) for i in range(5)), tmp_path, samples_per_shard=2)  # a rerun
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in written]
    assert [s.id for s in ShardReader(tmp_path)] == ["s0", "s1", "s2", "s3", "s4"]


def test_a_failure_before_the_first_shard_leaves_no_new_folder(tmp_path: Path) -> None:
    # `mm15 data pack` stopping at record 1 left an empty --out folder behind.
    def stream():
        yield _text_sample(0)
        raise RuntimeError("record 1 is bad")

    with pytest.raises(RuntimeError, match="record 1 is bad"):
        write_shards(stream(), tmp_path / "new" / "out", samples_per_shard=2)
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before is left where it was
    with pytest.raises(RuntimeError, match="record 1 is bad"):
        write_shards(stream(), tmp_path / "mine", samples_per_shard=2)
    assert (tmp_path / "mine").is_dir()


def test_failure_inside_a_tar_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_addfile = tarfile.TarFile.addfile

    def failing_addfile(self: tarfile.TarFile, tarinfo: tarfile.TarInfo, fileobj: object = None) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # the second sample's image, after its .json went into the temp file
            raise OSError("disk full")
        real_addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    sample = Sample("p", [Turn("user", "<image>")], "general", "s", images=[_pixels(0)])
    with pytest.raises(OSError, match="disk full"):
        write_shards([_text_sample(0), sample], tmp_path, samples_per_shard=5)
    assert list(tmp_path.iterdir()) == []


def test_shards_of_an_earlier_run_are_refused_or_replaced_whole(tmp_path: Path) -> None:
    write_shards((_text_sample(i) for i in range(5)), tmp_path, samples_per_shard=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="already holds 3 shard"):
        write_shards([_text_sample(9)], tmp_path, samples_per_shard=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    write_shards([_text_sample(7)], tmp_path, prefix="other")  # another prefix sits beside them
    write_shards([_text_sample(9)], tmp_path, samples_per_shard=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-000000.tar", "shard-000000.tar"]
    assert [s.id for s in ShardReader(tmp_path / "shard-000000.tar")] == ["s9"]
    # A replacing run that fails part-way leaves the earlier run whole, not its first shards replaced.
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing() -> Iterator[Sample]:
        yield from (_text_sample(i) for i in range(20, 25))
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(failing(), tmp_path, samples_per_shard=1, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept  # no staged file left either
    # No samples at all replace nothing: the earlier shards stay, and no new folder is made.
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"no samples to write .* its earlier shards are kept"):
        write_shards([], tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == kept
    with pytest.raises(ValueError, match="no samples to write"):
        write_shards(iter([]), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_invalid_sample_is_refused_before_writing(tmp_path: Path) -> None:
    bad = Sample("x", [Turn("user", "<image>")], "general", "s")  # a placeholder but no image
    with pytest.raises(ValueError, match="sample x"):
        write_shards([_text_sample(0), bad], tmp_path)
    with pytest.raises(ValueError, match="sample x"):
        write_llava([bad], tmp_path / "d.jsonl")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Interleaved and text-only


def test_interleaved_documents(tmp_path: Path, image_files: dict[str, Path]) -> None:
    docs = [
        {
            "texts": ["Intro.", None, "Middle.", None],
            "images": [None, "originals/photo.jpg", None, "originals/shot.png"],
        },
        {"id": "d2", "texts": ["Only text."], "images": [None], "source": "wiki"},
        {"texts": ["a", None], "images": [None, "originals/missing.jpg"]},
        {"texts": ["a", "b"], "images": [None]},
        {"texts": ["a", None], "images": ["originals/photo.jpg", None]},
        {"texts": ["an <image> literal"], "images": [None]},
    ]
    path = tmp_path / "obelics.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    reader = InterleavedReader(path, strict=False)
    first, second = list(reader)
    assert first.category == "interleaved" and first.source == "obelics" and first.id == "obelics-0"
    assert first.turns == [Turn("assistant", "Intro.\n<image>\nMiddle.\n<image>")]
    assert first.images == [image_files["jpg"], image_files["png"]]
    assert (second.id, second.source, second.images) == ("d2", "wiki", [])
    assert reader.skipped.as_dict() == {"missing_image": 1, "bad_record": 2, "image_count": 1}
    with pytest.raises(SourceError, match=r"line 3: missing_image"):
        list(InterleavedReader(path))
    spaced = next(iter(InterleavedReader(path, separator="\n\n", strict=False)))
    assert spaced.turns[0].content == "Intro.\n\n<image>\n\nMiddle.\n\n<image>"


def test_text_only_records(tmp_path: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be nice."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
        {"prompt": "2+2?", "response": "4", "system": "Math."},
        {"text": "Plain pre-training text.", "category": "text"},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": "Hi"},
        {"prompt": "only a prompt"},
        {"prompt": "<image> what?", "response": "?"},
        {"nothing": 1},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    reader = TextReader(path, strict=False)
    chat, qa, text = list(reader)
    assert chat.turns == [Turn("system", "Be nice."), Turn("user", "Hi"), Turn("assistant", "Hello")]
    assert qa.turns == [Turn("system", "Math."), Turn("user", "2+2?"), Turn("assistant", "4")]
    assert text.turns == [Turn("assistant", "Plain pre-training text.")]
    assert [s.category for s in (chat, qa, text)] == ["text-only", "text-only", "text"]
    assert all(s.images == [] for s in (chat, qa, text))
    assert reader.skipped.as_dict() == {
        "unknown_role": 1,
        "bad_conversations": 1,
        "bad_record": 2,
        "image_count": 1,
    }
    pretrain = list(TextReader(path, category="text", strict=False))
    assert {s.category for s in pretrain} == {"text"}
    with pytest.raises(SourceError, match=r"line 4: unknown_role"):
        list(TextReader(path))


# ---------------------------------------------------------------------------------------------------------
# Every reader's samples pass Sample.validate


def test_a_video_record_referring_to_a_region_is_refused(tmp_path: Path) -> None:
    """VideoQAReader yielded "<region0>" with no regions, which failed training in the chat renderer."""
    write_video(tmp_path / "v.mp4", [_pixels(k) for k in range(3)], fps=10)
    records = [
        {
            "id": "conv",
            "video": "v.mp4",
            "conversations": [{"from": "human", "value": "<video> <region0>?"}, ANSWER],
        },
        {"id": "open", "video": "v.mp4", "question": "What is at <region1>?", "answer": "x"},
        {"id": "mc", "video": "v.mp4", "question": "Which?", "candidates": ["<region0>", "b"], "answer": 1},
        {"id": "fine", "video": "v.mp4", "question": "What?", "answer": "x", "candidates": None},
        {"id": "gone", "video": "gone.mp4", "question": "<region0>", "answer": "x"},  # before the file
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    reader = VideoQAReader(path, num_frames=2, strict=False)
    assert [s.id for s in reader] == ["fine"] and reader.skipped.as_dict() == {"bad_region": 4}
    assert "(id 'conv'): bad_region: text refers to <region0> but there are 0 regions" in str(
        reader.skipped.examples["bad_region"][0]
    )
    with pytest.raises(SourceError, match=r"line 1 .*bad_region"):
        list(VideoQAReader(path, num_frames=2))
    fine = VideoQAReader(path, num_frames=2, strict=False).records()[3][2]
    assert "candidates" not in fine  # records() drops null fields, as the samples are read


def test_no_reader_yields_a_sample_that_fails_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last check, behind each reader's own: a parse that misses something is a counted bad_record,
    not a sample that fails when training encodes it."""
    broken = Sample("broken", [Turn("user", "<region0>"), Turn("assistant", "x")], "general", "s")
    monkeypatch.setattr(LlavaReader, "_parse", lambda self, record, path, sample_id: broken)
    monkeypatch.setattr(ShardReader, "_parse", staticmethod(lambda meta, key, members, sample_id: broken))
    monkeypatch.setattr(VideoQAReader, "_parse", lambda self, record, path, sample_id: broken)
    llava = _write_llava_file(tmp_path, [GOOD], ".jsonl")
    shard = _tar(tmp_path / "s.tar", [("k.json", _meta([]))])
    video = tmp_path / "qa.jsonl"
    video.write_text(json.dumps({"video": "v.mp4", "question": "q", "answer": "a"}))
    for reader in (LlavaReader(llava, strict=False), ShardReader(shard, strict=False)):
        assert list(reader) == [] and reader.skipped.as_dict() == {"bad_record": 1}
        assert "inconsistent sample (sample broken: <region0> but only 0 regions)" in str(
            reader.skipped.examples
        )
    with pytest.raises(SourceError, match="bad_record: inconsistent sample"):
        VideoQAReader(video).sample_at(0)


# ---------------------------------------------------------------------------------------------------------
# Input the readers cannot take: refused with a reason, or counted, never a traceback


TWO_TURNS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    "record",
    [
        {"text": "a", "prompt": "b", "response": "c"},
        {"messages": TWO_TURNS, "text": "dropped"},
        {"messages": TWO_TURNS, "prompt": "b", "response": "c"},
    ],
)
def test_a_text_record_giving_two_forms_is_refused(tmp_path: Path, record: dict[str, object]) -> None:
    """The first form found was packed and the other's text silently lost."""
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"text": "ok"}) + "\n")
    with pytest.raises(SourceError, match=r"line 1: bad_record: more than one form given"):
        list(TextReader(path))
    reader = TextReader(path, strict=False)
    assert [s.turns for s in reader] == [[Turn("assistant", "ok")]]
    assert reader.skipped.as_dict() == {"bad_record": 1}
    # A null field is an absent one, so it is no second form.
    path.write_text(json.dumps({"text": "kept", "messages": None}) + "\n")
    assert [s.turns for s in TextReader(path)] == [[Turn("assistant", "kept")]]


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" * 5000  # past sys.get_int_max_str_digits()


def test_json_past_pythons_limits_is_a_bad_json_record(tmp_path: Path) -> None:
    """json raises RecursionError (deep nesting) and ValueError (a long integer), not JSONDecodeError:
    a traceback, or an error naming no file or record, and --lenient stopped."""
    good = json.dumps({"text": "ok"})
    lines = tmp_path / "limits.jsonl"
    lines.write_text("\n".join([DEEP, good, '{"text": "x", "n": ' + HUGE_INT + "}", good]) + "\n")
    reader = TextReader(lines, strict=False)
    assert len(list(reader)) == 2 and reader.skipped.as_dict() == {"bad_json": 2}
    assert (
        "line 1: bad_json: not readable JSON (nested too deeply to parse)"
        in reader.skipped.examples["bad_json"][0]
    )
    assert "line 3: bad_json" in reader.skipped.examples["bad_json"][1]
    with pytest.raises(SourceError, match=r"limits.jsonl: line 1: bad_json"):
        list(TextReader(lines))
    for body, location in [(DEEP, "record 0"), ('{"text": "x", "n": ' + HUGE_INT + "}", "record 1")]:
        array = tmp_path / "limits.json"
        array.write_text("[" + (good + ", " if location == "record 1" else "") + body + "]")
        with pytest.raises(SourceError, match=rf"limits.json: {location}: bad_json"):
            list(TextReader(array))
        lenient = TextReader(array, strict=False)
        assert len(list(lenient)) == (location == "record 1") and lenient.skipped.as_dict() == {"bad_json": 1}


def test_an_image_name_too_long_for_the_os_is_a_missing_image(tmp_path: Path) -> None:
    """Path.is_file raised OSError (ENAMETOOLONG) on Python 3.11: one such record stopped a lenient pack."""
    _pixels(0).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    records = [{"id": "long", "image": "a" * 5000 + ".png", "conversations": turns}]
    records.append({"id": "ok", "image": "a.png", "conversations": turns})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    reader = LlavaReader(path, tmp_path, strict=False, check_images=True)
    assert [s.id for s in reader] == ["ok"] and reader.skipped.as_dict() == {"missing_image": 1}
    with pytest.raises(SourceError, match=r"\(id 'long'\): missing_image: .*File name too long"):
        list(LlavaReader(path, tmp_path, check_images=True))


def test_a_reader_says_why_its_input_is_not_a_file(tmp_path: Path) -> None:
    """A folder given as the annotations file was called "no such file"."""
    with pytest.raises(FileNotFoundError, match=r": is a directory, not a file"):
        LlavaReader(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match=r": File name too long"):
        TextReader(tmp_path / ("a" * 300 + ".jsonl"))
    (tmp_path / "x.tar").mkdir()
    with pytest.raises(FileNotFoundError, match=r"x.tar: not a shard file \(is a directory, not a file\)"):
        ShardReader(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cannot be read as a shard or shard folder \(File name too"):
        ShardReader(tmp_path / ("a" * 300))
