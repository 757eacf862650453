"""``mm15 data ...``: make synthetic shards, pack LLaVA JSON into shards, draw samples, count them."""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mm15.data.sample import CATEGORIES, Sample
from mm15.paths import check_output_dir, shown

if TYPE_CHECKING:
    from mm15.data.sources import ShardReader, SkipCounter

app = typer.Typer(help="Data: synthesise, pack, show and count samples.", no_args_is_help=True)
console = Console()


OVERWRITE_HELP = "Replace the shards an earlier run of this command wrote to --out (else it stops)."


def _count(n: int, noun: str) -> str:
    """ "1 sample", "2 samples": counts in messages."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fail(err: Exception | str) -> NoReturn:
    """The one-line ``error:`` (exit 2); an earlier run's shards get the way out added."""
    hint = ": pass --overwrite to replace them, or another --out" if isinstance(err, FileExistsError) else ""
    console.print(f"[red]error:[/red] {shown(err)}{hint}", soft_wrap=True)
    raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@app.command()
def synth(
    category: Annotated[str, typer.Option(help="A generator name, or a category (all its generators).")],
    n: Annotated[int, typer.Option(min=1, help="Samples to make.")],
    out: Annotated[Path, typer.Option(help="Folder for the shards.")],
    split: Annotated[str, typer.Option(help="train, or eval (held-out seeds).")] = "train",
    seed: Annotated[int, typer.Option(help="Seed of the stream.")] = 0,
    per_shard: Annotated[int, typer.Option(min=1, help="Samples per shard.")] = 500,
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
) -> None:
    """Generate N synthetic samples (round-robin over the category's generators) into WebDataset shards."""
    from mm15.data.sources import write_shards
    from mm15.data.synth import generate, synth_names

    if split not in ("train", "eval"):
        raise typer.BadParameter("--split must be train or eval")
    try:
        names = synth_names(category)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    try:
        check_output_dir(out, "--out")  # before the progress bar (write_shards checks it again)
    except ValueError as err:
        _fail(err)

    with _progress() as progress:
        task = progress.add_task(f"synth {category} ({split})", total=n)

        def stream() -> Iterator[Sample]:
            for i in range(n):
                name = names[i % len(names)]
                yield generate(name, i // len(names), split=split, seed=seed)  # type: ignore[arg-type]
                progress.advance(task)

        try:
            shards = write_shards(
                stream(), out, samples_per_shard=per_shard, prefix=f"{category}-{split}", overwrite=overwrite
            )
        # OSError: the folder is checked first (write_shards), but can still fail to be made or written
        # (changed since, a full disk); FileExistsError, an earlier run's shards, is one too.
        except (ValueError, OSError) as err:
            _fail(err)
    console.print(f"wrote {_count(n, 'sample')} in {_count(len(shards), 'shard')} to {shown(out)}")


PACK_FORMATS = ("llava", "interleaved", "text")


@app.command()
def pack(
    annotations: Annotated[list[Path], typer.Argument(help="JSON or JSONL files of one format.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the shards.")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Folder the image paths are relative to (llava, interleaved).")
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            "--format",
            help="llava (conversations with images), interleaved (OBELICS-like documents) or text "
            "(messages, prompt/response or plain text); docs/data.md.",
        ),
    ] = "llava",
    category: Annotated[
        str | None,
        typer.Option(
            help=f"Category of the samples ({', '.join(CATEGORIES)}); default general for llava, "
            "text-only for text (interleaved documents are always interleaved)."
        ),
    ] = None,
    lenient: Annotated[
        bool, typer.Option(help="Skip and count malformed records instead of stopping.")
    ] = False,
    per_shard: Annotated[int, typer.Option(min=1, help="Samples per shard.")] = 500,
    overwrite: Annotated[bool, typer.Option(help=OVERWRITE_HELP)] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Read and check every record and image header, write nothing: what would be packed."
        ),
    ] = False,
) -> None:
    """Pack LLaVA, interleaved or text JSON/JSONL records (and their images) into WebDataset shards."""
    from mm15.data.sources import (
        InterleavedReader,
        LlavaReader,
        SourceError,
        TextReader,
        check_shard_folder,
        write_shards,
    )

    if out is None and not dry_run:
        raise typer.BadParameter("--out is needed (or --dry-run, to check the records without writing)")
    if kind not in PACK_FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(PACK_FORMATS)}, got {kind!r}")
    if images is not None:
        try:
            is_folder = images.is_dir()
        except OSError as err:  # Path.is_dir raises on 3.11 for a name over the length limit, say
            raise typer.BadParameter(f"--images {images}: {err.strerror or err}") from None
        if not is_folder:
            raise typer.BadParameter(f"--images {images} is not a folder")
    if kind != "text" and images is None:
        raise typer.BadParameter(f"--images is needed for {kind} records: image paths are relative to it")
    if kind == "interleaved" and category not in (None, "interleaved"):
        raise typer.BadParameter(f"interleaved documents are category interleaved, not {category!r}")
    if out is not None:
        # Before every record and image header is read; a dry run with --out checks it too (and, like
        # the real run, refuses earlier shards without --overwrite), creating nothing.
        try:
            check_shard_folder(out, "packed", overwrite, "--out")
        except (ValueError, FileExistsError) as err:
            _fail(err)
    reader: LlavaReader | InterleavedReader | TextReader | None = None
    try:
        # Every image's header is read here, once, so a file that is not an image (or boxes in another
        # frame than its pixels) is refused now rather than found by a training run.
        if kind == "llava":
            reader = LlavaReader(
                annotations, images, category=category or "general", strict=not lenient, check_images=True
            )
        elif kind == "interleaved":
            reader = InterleavedReader(annotations, images, strict=not lenient, check_images=True)
        else:
            reader = TextReader(annotations, category=category or "text-only", strict=not lenient)
        packed = 0
        with _progress() as progress:
            # The records' total is unknown until the files are read (they are streamed): a count.
            verb = "checking" if dry_run else "packing"
            task = progress.add_task(f"{verb} {len(annotations)} file(s)", total=None)

            def counted() -> Iterator[Sample]:
                nonlocal packed
                for sample in reader:
                    yield sample
                    packed += 1
                    progress.advance(task)

            if dry_run:
                for _ in counted():
                    pass
            else:
                assert out is not None
                shards = write_shards(
                    counted(), out, samples_per_shard=per_shard, prefix="packed", overwrite=overwrite
                )
    except (SourceError, ValueError, OSError) as err:  # OSError: --out could not be made or written
        if reader is not None:  # what lenient reading skipped before the error
            _report_pack_skips(reader.skipped)
        _fail(err)
    if not packed:  # a dry run where every record was skipped (write_shards refuses to write none)
        _report_pack_skips(reader.skipped)
        _fail(ValueError(f"no record of {len(annotations)} file(s) could be packed"))
    if dry_run:
        console.print(
            f"would write {_count(packed, 'sample')} in {_count(-(-packed // per_shard), 'shard')} "
            "(dry run: nothing written)"
        )
    else:
        console.print(f"wrote {_count(packed, 'sample')} in {_count(len(shards), 'shard')} to {shown(out)}")
    _report_pack_skips(reader.skipped)


def _report_pack_skips(skipped: SkipCounter) -> None:
    """The skip counts per reason and the first records of each, so they can be found and fixed."""
    if not skipped.total:
        return
    console.print(f"skipped (counted): {shown(skipped.as_dict())}", soft_wrap=True)
    for reason, examples in skipped.examples.items():
        more = skipped[reason] - len(examples)
        console.print(f"  {shown(reason)}, first {len(examples)}" + (f" ({more} more)" if more else "") + ":")
        for example in examples:
            console.print(f"    {shown(example)}", soft_wrap=True)


def _check_shard_folder(directory: Path) -> None:
    try:
        is_folder = directory.is_dir()
    except OSError as err:  # Path.is_dir raises on 3.11 for a name over the length limit, say
        raise typer.BadParameter(f"{directory}: {err.strerror or err}") from None
    if not is_folder or not any(directory.glob("*.tar")):
        raise typer.BadParameter(f"{directory} holds no .tar shards")


def _lenient_reader(directory: Path) -> ShardReader:
    """A reader of the folder's shards that counts damaged records instead of stopping: these commands
    are how one looks at a damaged data set."""
    from mm15.data.sources import ShardReader

    _check_shard_folder(directory)
    try:
        return ShardReader(directory, strict=False)
    except (OSError, ValueError) as err:  # an entry named *.tar that is a folder, or a dangling link
        raise typer.BadParameter(str(err)) from None


def _report_skips(reader: ShardReader) -> None:
    skipped = reader.skipped.as_dict()
    if skipped:
        console.print(
            f"skipped (counted; mm15 train would stop at the first): {shown(skipped)}", soft_wrap=True
        )


@app.command()
def show(
    directory: Annotated[Path, typer.Argument(help="Folder of shards.")],
    # max: islice refuses a stop past sys.maxsize with a traceback.
    n: Annotated[int, typer.Option(min=1, max=sys.maxsize, help="Samples to draw.")] = 8,
    out: Annotated[Path, typer.Option(help="PNG (or JPEG) file to write.")] = Path("sheet.png"),
    columns: Annotated[int, typer.Option(min=1, help="Cards per row.")] = 2,
) -> None:
    """Draw the first N samples of a shard folder: images with boxes and points, and the dialogue."""
    from mm15.data.show import contact_sheet
    from mm15.viz import check_picture_path

    try:
        check_picture_path(out, "--out")
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    reader = _lenient_reader(directory)
    samples = list(itertools.islice(iter(reader), n))
    _report_skips(reader)
    if not samples:  # every record damaged: nothing to draw, as stats finds nothing to count
        raise typer.BadParameter(f"{directory} holds no samples")
    sheet, broken = contact_sheet(samples, columns=columns)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(out)
    except OSError as err:  # checked above; this is the folder changing since, or a full disk
        _fail(f"cannot write --out {out}: {err.strerror or err}")
    console.print(f"drew {_count(len(samples), 'sample')} to {shown(out)}")
    if broken:
        console.print(
            f"images that do not decode (grey on the sheet) in {len(broken)} samples: {shown(broken)}",
            soft_wrap=True,
        )


@app.command()
def stats(directory: Annotated[Path, typer.Argument(help="Folder of shards.")]) -> None:
    """Count the samples of a shard folder by category and source, with images, turns and regions."""
    reader = _lenient_reader(directory)
    # Streamed: one sample at a time is held, so a folder of any size can be counted.
    totals: dict[tuple[str, str], Counter[str]] = {}  # by (source, category): a source can hold several
    by_category: Counter[str] = Counter()
    with _progress() as progress:
        task = progress.add_task(f"reading {shown(directory)}", total=None)
        for sample in reader:
            counts = totals.setdefault((sample.source, sample.category), Counter())
            counts["samples"] += 1
            counts["images"] += len(sample.images)
            counts["turns"] += len(sample.turns)
            counts["regions"] += len(sample.regions)
            by_category[sample.category] += 1
            progress.advance(task)
    total = sum(by_category.values())
    if not total:
        _report_skips(reader)
        raise typer.BadParameter(f"{directory} holds no samples")
    table = Table(title=f"{total} samples in {shown(directory)}")
    for column in ("source", "category", "samples", "images/sample", "turns/sample", "regions/sample"):
        table.add_column(column)
    for (source, category), counts in sorted(totals.items()):
        n = counts["samples"]
        table.add_row(
            shown(source),
            shown(category),
            str(n),
            f"{counts['images'] / n:.2f}",
            f"{counts['turns'] / n:.2f}",
            f"{counts['regions'] / n:.2f}",
        )
    console.print(table)
    console.print("by category: " + ", ".join(f"{shown(c)} {k}" for c, k in sorted(by_category.items())))
    _report_skips(reader)
