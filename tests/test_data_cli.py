"""``mm15 data``: synth -> stats -> show, pack with counted skips, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

import mm15.data.show as show_module
from mm15.cli import app
from mm15.data.sample import Sample, Turn
from mm15.data.sources import ShardReader, write_shards

runner = CliRunner()
ANSWER = {"from": "gpt", "value": "a"}


def test_synth_stats_and_show(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    result = runner.invoke(
        app,
        [
            "data",
            "synth",
            "--category",
            "general",
            "--n",
            "7",
            "--out",
            str(out),
            "--split",
            "eval",
            "--per-shard",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    samples = list(ShardReader(out))
    assert len(samples) == 7 and len(list(out.glob("*.tar"))) == 3
    # Round-robin over the category's generators, from the eval seeds.
    assert {s.source for s in samples} == {
        "synth/general-color",
        "synth/general-count",
        "synth/general-spatial",
    }
    assert all("/eval/" in s.id for s in samples)
    stats = runner.invoke(app, ["data", "stats", str(out)])
    assert stats.exit_code == 0 and "general 7" in stats.output
    sheet = tmp_path / "sheet.png"
    shown = runner.invoke(app, ["data", "show", str(out), "--n", "4", "--out", str(sheet)])
    assert shown.exit_code == 0, shown.output
    with Image.open(sheet) as picture:
        assert picture.width > 1000 and picture.height > 300  # 2 columns x 2 rows of cards


def test_synth_never_mixes_runs_in_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    args = ["data", "synth", "--category", "general", "--out", str(out), "--per-shard", "2"]
    assert runner.invoke(app, [*args, "--n", "5"]).exit_code == 0
    first = sorted(p.name for p in out.iterdir())
    assert first == [f"general-train-00000{i}.tar" for i in range(3)]
    again = runner.invoke(app, [*args, "--n", "2", "--seed", "9"])
    assert again.exit_code == 2 and "already holds 3 shard(s)" in flat(again.output)
    assert "--overwrite" in again.output and sorted(p.name for p in out.iterdir()) == first
    replaced = runner.invoke(app, [*args, "--n", "2", "--seed", "9", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    # The earlier run's two extra shards are gone: the folder holds only the new run's samples.
    assert [p.name for p in out.iterdir()] == ["general-train-000000.tar"]
    assert sorted(s.id for s in ShardReader(out)) == ["general-color/train/9/0", "general-count/train/9/0"]


def test_stats_has_a_row_per_source_and_category(tmp_path: Path) -> None:
    """One source with two categories was one row counting every sample under its first category."""
    turns = [Turn("user", "q"), Turn("assistant", "a")]
    categories = ["general", "ocr", "ocr", "ocr"]
    write_shards([Sample(f"s{i}", turns, c, "mix") for i, c in enumerate(categories)], tmp_path)
    result = runner.invoke(app, ["data", "stats", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:4] for line in result.output.splitlines() if line.count("│") > 3]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["mix", "general", "1"],
        ["mix", "ocr", "3"],
    ]


def test_stats_streams_the_folder(tmp_path: Path) -> None:
    """``data stats`` holds one sample at a time: its peak memory does not grow with the folder."""
    import tracemalloc

    payload = bytes(range(256)) * 2048  # 512 KB of image bytes per sample
    turns = [Turn("user", "<image>"), Turn("assistant", "x")]

    def peak_of_stats(n: int) -> int:
        folder = tmp_path / str(n)
        write_shards(
            [Sample(f"s{i}", turns, "general", f"src{i % 2}", images=[payload]) for i in range(n)],
            folder,
            samples_per_shard=4,
        )
        runner.invoke(app, ["data", "stats", str(tmp_path / "4")])  # warm: first-call allocations
        tracemalloc.start()
        try:
            result = runner.invoke(app, ["data", "stats", str(folder)])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.exit_code == 0, result.output
        assert f"{n} samples in" in result.output and f"general {n}" in result.output
        return peak

    small, large = peak_of_stats(4), peak_of_stats(24)
    assert large - small < 2 * len(payload), f"{(large - small) / 1e6:.1f} MB more for 20 more samples"


def test_show_and_stats_count_a_damaged_shard_instead_of_stopping(tmp_path: Path) -> None:
    samples = [Sample(f"s{i}", [Turn("user", "q"), Turn("assistant", "a")], "text", "t") for i in range(4)]
    (first,) = write_shards(samples, tmp_path, samples_per_shard=4)
    (tmp_path / "cut.tar").write_bytes(first.read_bytes()[:2600])  # a shard cut short
    readable = len(list(ShardReader(tmp_path, strict=False)))  # the 4, and what precedes the cut
    assert 4 < readable < 8
    counted = runner.invoke(app, ["data", "stats", str(tmp_path)])
    assert counted.exit_code == 0, counted.output
    assert f"text {readable}" in counted.output and "{'bad_shard': 1}" in counted.output
    shown = runner.invoke(app, ["data", "show", str(tmp_path), "--out", str(tmp_path / "sheet.png")])
    assert shown.exit_code == 0, shown.output
    assert f"drew {readable} samples" in shown.output and "{'bad_shard': 1}" in shown.output


def test_stats_counts_a_zero_filled_hole_in_a_shard(tmp_path: Path) -> None:
    """A zero block inside a shard (a crash, an interrupted preallocated download) read to tarfile as the
    end of the archive: stats counted the samples before it as the whole shard, with no skip."""
    samples = [Sample(f"s{i}", [Turn("user", "q"), Turn("assistant", "a")], "text", "t") for i in range(5)]
    (shard,) = write_shards(samples, tmp_path, samples_per_shard=5)
    data = bytearray(shard.read_bytes())
    data[2048 : 2048 + 512] = bytes(512)  # the header of sample 2 (one header + one data block each)
    shard.write_bytes(bytes(data))
    counted = runner.invoke(app, ["data", "stats", str(tmp_path)])
    assert counted.exit_code == 0, counted.output
    assert "text 2" in counted.output and "{'bad_shard': 1}" in counted.output


def test_a_pack_that_fails_part_way_writes_no_shard(tmp_path: Path) -> None:
    """A strict pack stopping at record 3 left the shards of records 1 and 2 in --out, which read as a
    complete data set, and a rerun was refused ('already holds 2 shard(s)')."""
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "a.png")
    good = [
        {"id": f"r{i}", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, ANSWER]}
        for i in range(3)
    ]
    half = tmp_path / "half.jsonl"
    half.write_text("\n".join(json.dumps(r) for r in [good[0], good[1], {"id": "bad"}, good[2]]))
    out = tmp_path / "part"
    args = ["data", "pack", str(half), "--images", str(tmp_path), "--out", str(out), "--per-shard", "1"]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 2 and "(id 'bad'): bad_conversations" in failed.output, failed.output
    assert not out.exists()  # no shard, and no folder this run made
    out.mkdir()
    assert runner.invoke(app, args).exit_code == 2 and list(out.iterdir()) == []  # a folder that was there
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("\n".join(json.dumps(r) for r in good))
    rerun = runner.invoke(app, [*args[:2], str(fixed), *args[3:]])
    assert rerun.exit_code == 0 and "wrote 3 samples in 3 shards" in rerun.output, rerun.output
    # Replacing that run with one that fails part-way leaves it whole: the same staging.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [s.id for s in ShardReader(out)] == ["r0", "r1", "r2"]


def test_pack_counts_skips_in_lenient_mode(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "a.png")
    records = [
        {
            "id": "ok",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Green."},
            ],
        },
        {
            "id": "gone",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "?"}],
        },
        {
            "id": "text",
            "image": "notes.png",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "?"}],
        },
        {
            "id": "frame",  # a box in 0-1000 units on a 40 x 30 image
            "image": "a.png",
            "regions": [{"image": 0, "box": [100, 200, 400, 900]}],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in <region0>?"},
                {"from": "gpt", "value": "?"},
            ],
        },
    ]
    (tmp_path / "notes.png").write_text("a text file named .png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = [
        "data",
        "pack",
        str(tmp_path / "data.json"),
        "--images",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    strict = runner.invoke(app, args)
    assert strict.exit_code == 2 and "missing" in strict.output
    lenient = runner.invoke(app, [*args, "--lenient"])
    assert lenient.exit_code == 0, lenient.output
    assert "{'missing_image': 1, 'bad_image': 1, 'bad_region': 1}" in lenient.output
    flat = " ".join(lenient.output.split())
    assert "wrote 1 sample in 1 shard to" in flat, lenient.output
    # Each reason lists its first records, so they can be found and fixed.
    assert "missing_image, first 1:" in flat and "(id 'gone'): missing_image" in flat, lenient.output
    assert "(id 'frame'): bad_region" in flat, lenient.output
    assert [s.id for s in ShardReader(tmp_path / "o")] == ["ok"]
    # --dry-run reads and checks everything and writes nothing; without it --out is needed.
    check = [a for a in args if a not in ("--out", str(tmp_path / "o"))]
    dry = runner.invoke(app, [*check, "--dry-run", "--lenient"])
    flat = " ".join(dry.output.split())
    assert dry.exit_code == 0 and "would write 1 sample in 1 shard (dry run: nothing written)" in flat, flat
    assert "{'missing_image': 1, 'bad_image': 1, 'bad_region': 1}" in flat
    strict_dry = runner.invoke(app, [*check, "--dry-run"])
    assert strict_dry.exit_code == 2 and "missing_image" in strict_dry.output
    # A dry run with --out checks it as the real run would: earlier shards (without --overwrite) and a
    # file in the folder's place are refused, and nothing is created.
    scratch = tmp_path_factory.mktemp("dry")
    (scratch / "file").write_text("not a folder")
    for out, message in (
        (tmp_path / "o", "already holds 1 shard(s)"),
        (scratch / "file", "exists and is not a directory"),
    ):
        refused = runner.invoke(app, [*check, "--dry-run", "--lenient", "--out", str(out)])
        flat = " ".join(refused.output.split())
        assert refused.exit_code == 2 and message in flat, flat
    overwrite = [*check, "--dry-run", "--lenient", "--out", str(tmp_path / "o"), "--overwrite"]
    assert runner.invoke(app, overwrite).exit_code == 0
    fresh = scratch / "fresh"
    assert runner.invoke(app, [*check, "--dry-run", "--lenient", "--out", str(fresh)]).exit_code == 0
    assert not fresh.exists()
    # Every record skipped: an error (exit 2) with the skips listed, not an empty folder and exit 0.
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps([records[1]]))
    for extra in (["--out", str(tmp_path / "none")], ["--dry-run"]):
        nothing = runner.invoke(
            app, ["data", "pack", str(gone), "--images", str(tmp_path), *extra, "--lenient"]
        )
        flat = " ".join(nothing.output.split())
        assert nothing.exit_code == 2 and "(id 'gone'): missing_image" in flat, nothing.output
        assert "no samples to write" in flat or "no record of 1 file(s) could be packed" in flat, flat
    gone.unlink()
    no_out = runner.invoke(app, check)
    assert no_out.exit_code == 2 and "--out is needed" in " ".join(no_out.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "data.json", "notes.png", "o"]


def test_pack_text_and_interleaved_files(tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "a.png")
    text = tmp_path / "text.jsonl"
    text.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
        + json.dumps({"text": "a plain document"})
        + "\n"
    )
    pack_text = ["data", "pack", str(text), "--format", "text", "--category", "text"]
    packed = runner.invoke(app, [*pack_text, "--out", str(tmp_path / "t")])
    assert packed.exit_code == 0, packed.output
    samples = list(ShardReader(tmp_path / "t"))
    assert [s.category for s in samples] == ["text", "text"]
    assert samples[1].turns[-1].content == "a plain document"

    documents = tmp_path / "docs.jsonl"
    document_record = {"texts": ["Intro", None, "After"], "images": [None, "a.png", None]}
    documents.write_text(json.dumps(document_record) + "\n")
    args = ["data", "pack", str(documents), "--format", "interleaved", "--out", str(tmp_path / "i")]
    needs_images = runner.invoke(app, args)
    assert needs_images.exit_code == 2 and "--images is needed for interleaved" in flat(needs_images.output)
    packed = runner.invoke(app, [*args, "--images", str(tmp_path)])
    assert packed.exit_code == 0, packed.output
    (document,) = ShardReader(tmp_path / "i")
    assert document.category == "interleaved" and document.turns[-1].content == "Intro\n<image>\nAfter"
    assert len(document.images) == 1
    unknown = runner.invoke(app, ["data", "pack", str(text), "--format", "xml", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2
    assert "--format must be one of llava, interleaved, text" in flat(unknown.output)


def flat(output: str) -> str:
    """Click's error box wraps long messages at the terminal width: join the lines back up."""
    return " ".join(output.replace("│", " ").split())


def test_unknown_category_and_empty_folder_are_clear_errors(tmp_path: Path) -> None:
    bad = runner.invoke(app, ["data", "synth", "--category", "poetry", "--n", "1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "neither a generator" in flat(bad.output)
    empty = runner.invoke(app, ["data", "stats", str(tmp_path)])
    assert empty.exit_code == 2 and "no .tar shards" in flat(empty.output)
    taken = tmp_path / "taken"
    taken.write_text("notes")
    synth_one = ["data", "synth", "--category", "general", "--n", "1", "--out"]
    onto_file = runner.invoke(app, [*synth_one, str(taken)])
    assert onto_file.exit_code == 2 and "exists and is not a directory" in flat(onto_file.output)
    assert taken.read_text() == "notes"
    for option, value, message in [
        ("--per-shard", "0", "greater than or equal to 1"),
        ("--n", "0", "greater than or equal to 1"),
    ]:
        bad_value = runner.invoke(
            app, ["data", "synth", "--category", "general", "--n", "1", "--out", str(tmp_path), option, value]
        )
        assert bad_value.exit_code == 2 and message in flat(bad_value.output), option
    pack = ["data", "pack", str(tmp_path / "gone.json"), "--out", str(tmp_path / "p")]
    no_file = runner.invoke(app, [*pack, "--images", str(tmp_path)])
    assert no_file.exit_code == 2 and "gone.json: no such file" in flat(no_file.output)
    no_folder = runner.invoke(app, [*pack, "--images", str(tmp_path / "nowhere")])
    assert no_folder.exit_code == 2 and "nowhere is not a folder" in flat(no_folder.output)
    runner.invoke(app, ["data", "synth", "--category", "general", "--n", "1", "--out", str(tmp_path / "s")])
    for extra, message in [
        (["--out", str(tmp_path / "sheet.txt")], "--out must end in .png, .jpg or .jpeg"),
        (["--columns", "0"], "greater than or equal to 1"),
        (["--n", "0"], "greater than or equal to 1"),
    ]:
        shown = runner.invoke(app, ["data", "show", str(tmp_path / "s"), *extra])
        assert shown.exit_code == 2 and message in flat(shown.output), extra


def test_show_draws_undecodable_images_and_names_their_samples(tmp_path: Path) -> None:
    good = Image.new("RGB", (40, 30), (200, 10, 10))
    turns = [Turn("user", "<image> Colour?"), Turn("assistant", "Red.")]
    samples = [
        Sample(id="ok", turns=turns, category="general", source="t", images=[good]),
        Sample(id="junk", turns=turns, category="general", source="t", images=[b"not an image at all"]),
    ]
    write_shards(samples, tmp_path / "shards")
    sheet = tmp_path / "sheet.png"
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "shards"), "--out", str(sheet)])
    assert shown.exit_code == 0, shown.output
    assert "images that do not decode (grey on the sheet) in 1 samples: ['junk']" in flat(shown.output)
    with Image.open(sheet) as picture:
        card = picture.convert("RGB").crop((520 + 8, 0, 2 * 520 + 8, 260))  # the second card
        assert (200, 200, 200) in {colour for _, colour in card.getcolors(1 << 16)}  # the grey slot


def test_show_of_a_folder_with_no_readable_sample_is_a_clear_error(tmp_path: Path) -> None:
    """Every record damaged: an error like stats gives, not contact_sheet's ValueError traceback."""
    (tmp_path / "x.tar").write_bytes(b"not a tar archive at all" * 40)
    sheet = tmp_path / "sheet.png"
    shown = runner.invoke(app, ["data", "show", str(tmp_path), "--out", str(sheet)])
    assert shown.exit_code == 2, shown.output
    assert shown.exception is None or isinstance(shown.exception, SystemExit), shown.exception
    assert f"{tmp_path} holds no samples" in flat(shown.output) and "{'bad_shard': 1}" in shown.output
    assert not sheet.exists()


def test_show_refuses_a_sheet_path_under_a_file_before_drawing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # short relative paths: Click's error box breaks long ones anywhere
    runner.invoke(app, ["data", "synth", "--category", "general", "--n", "2", "--out", "s"])
    taken = Path("a.png")
    taken.write_text("notes")
    drawn: list[int] = []
    real = show_module.contact_sheet
    monkeypatch.setattr(show_module, "contact_sheet", lambda *a, **k: drawn.append(1) or real(*a, **k))
    for sheet, why in [
        (taken / "sheet.png", "its folder a.png exists and is not a directory"),
        (taken / "sub" / "sheet.png", "its folder a.png/sub cannot be created: a.png is not a directory"),
    ]:
        shown = runner.invoke(app, ["data", "show", "s", "--out", str(sheet)])
        assert shown.exit_code == 2, shown.output
        assert f"--out {sheet}: {why}" in flat(shown.output), shown.output
    assert not drawn and taken.read_text() == "notes"

    # A folder that breaks after the check (or a full disk): a one-line error, not a traceback.
    def full_disk(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    failed = runner.invoke(app, ["data", "show", "s", "--out", "sheet.png"])
    assert failed.exit_code == 2, failed.output
    assert "error: cannot write --out sheet.png: No space left on device" in flat(failed.output)


def _assert_clean_error(result: Result, message: str) -> None:
    """Exit 2 with ``message`` in the output, and no exception but Click's exit (no traceback)."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert message in flat(result.output), result.output


def test_stats_and_show_name_an_entry_that_is_not_a_shard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder named x.tar or a dangling link c.tar: ShardReader's FileNotFoundError was a traceback."""
    monkeypatch.chdir(tmp_path)  # short relative paths: Click's error box breaks long ones anywhere
    runner.invoke(app, ["data", "synth", "--category", "general", "--n", "2", "--out", "s"])
    Path("s/x.tar").mkdir()
    for command in (["stats", "s"], ["show", "s", "--out", "sheet.png"]):
        _assert_clean_error(runner.invoke(app, ["data", *command]), "s/x.tar: not a shard file")
    Path("s/x.tar").rmdir()
    Path("s/c.tar").symlink_to("nowhere.tar")
    for command in (["stats", "s"], ["show", "s", "--out", "sheet.png"]):
        _assert_clean_error(runner.invoke(app, ["data", *command]), "s/c.tar: not a shard file")
    assert not Path("sheet.png").exists()


def test_a_name_too_long_for_the_os_is_a_clear_error(tmp_path: Path) -> None:
    """Path.is_file / is_dir raise OSError (ENAMETOOLONG) on Python 3.11: tracebacks and a stopped pack."""
    long_name = str(tmp_path / ("a" * 300))
    _assert_clean_error(runner.invoke(app, ["data", "stats", long_name]), "File name too long")
    _assert_clean_error(
        runner.invoke(app, ["data", "pack", long_name + ".json", "--images", str(tmp_path), "--dry-run"]),
        "File name too long",
    )
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "a.png")
    turns = [{"from": "human", "value": "<image>\nq"}, ANSWER]
    records = [{"id": "long", "image": "a" * 5000 + ".png", "conversations": turns}]
    records.append({"id": "ok", "image": "a.png", "conversations": turns})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    pack = ["data", "pack", str(data), "--images", str(tmp_path), "--dry-run"]
    lenient = runner.invoke(app, [*pack, "--lenient"])
    assert lenient.exit_code == 0, lenient.output
    assert "would write 1 sample" in flat(lenient.output) and "{'missing_image': 1}" in lenient.output
    _assert_clean_error(runner.invoke(app, pack), "(id 'long'): missing_image")


def test_pack_counts_json_past_pythons_limits_as_bad_json(tmp_path: Path) -> None:
    """Deep nesting was a RecursionError traceback, a 5000-digit integer an error naming no record."""
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nq"}, ANSWER]})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(["[" * 100_000 + "]" * 100_000, good, '{"n": ' + "1" * 5000 + "}"]) + "\n")
    pack = ["data", "pack", str(data), "--images", str(tmp_path), "--dry-run"]
    lenient = runner.invoke(app, [*pack, "--lenient"])
    assert lenient.exit_code == 0, lenient.output
    assert "would write 1 sample" in flat(lenient.output) and "{'bad_json': 2}" in lenient.output
    _assert_clean_error(runner.invoke(app, pack), "data.jsonl: line 1: bad_json")
    array = tmp_path / "data.json"
    array.write_text(f'[{good}, {{"n": {"1" * 5000}}}]')
    _assert_clean_error(
        runner.invoke(app, ["data", "pack", str(array), "--images", str(tmp_path), "--dry-run"]),
        "data.json: record 1: bad_json",
    )


def test_pack_refuses_a_text_record_giving_two_forms(tmp_path: Path) -> None:
    """{"text", "prompt", "response"} packed the prompt and response and silently dropped the text."""
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "a", "prompt": "b", "response": "c"}) + "\n")
    pack = ["data", "pack", str(data), "--format", "text", "--dry-run"]
    _assert_clean_error(runner.invoke(app, pack), "line 1: bad_record: more than one form given")
    lenient = runner.invoke(app, [*pack, "--lenient"])
    assert lenient.exit_code == 2 and "{'bad_record': 1}" in lenient.output, lenient.output


def test_pack_of_a_folder_says_it_is_a_folder(tmp_path: Path) -> None:
    """A folder as the annotations file was called "no such file"."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    result = runner.invoke(app, ["data", "pack", str(imgs), "--images", str(imgs), "--dry-run"])
    _assert_clean_error(result, "imgs: is a directory, not a file")


def test_show_uses_no_more_columns_than_cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--columns 100000 allocated a canvas 100000 cards wide (minutes, gigabytes) for 8 cards."""
    monkeypatch.chdir(tmp_path)
    runner.invoke(app, ["data", "synth", "--category", "general", "--n", "2", "--out", "s"])
    shown = runner.invoke(app, ["data", "show", "s", "--columns", "50", "--out", "sheet.png"])
    assert shown.exit_code == 0, shown.output
    with Image.open("sheet.png") as picture:
        assert picture.width == 2 * (show_module.CARD_WIDTH + 8)  # the two cards, not 50 columns


def test_show_refuses_a_sample_count_past_sys_maxsize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--n 10**20 was an islice ValueError traceback."""
    monkeypatch.chdir(tmp_path)
    runner.invoke(app, ["data", "synth", "--category", "general", "--n", "2", "--out", "s"])
    too_many = runner.invoke(app, ["data", "show", "s", "--n", str(10**20), "--out", "sheet.png"])
    _assert_clean_error(too_many, "less than or equal to")
    assert not Path("sheet.png").exists()
