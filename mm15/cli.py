"""The ``mm15`` command line."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from mm15.geometry import ImagePlanConfig, TilePlan, plan_image
from mm15.image import ImageError, load_image
from mm15.paths import check_output_dir, model_name_of, shown
from mm15.viz import check_picture_path, draw_plan

app = typer.Typer(
    help="mm15: an open implementation of the MM1.5 multimodal LLM recipe.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _register_subcommands() -> None:
    from mm15.data.commands import app as data_app
    from mm15.serve.commands import chat, serve

    app.add_typer(data_app, name="data")
    app.command()(chat)
    app.command()(serve)


_register_subcommands()


def _fail(err: Exception | str) -> NoReturn:
    """The one-line ``error:`` a user can act on (its paths printed as typed, not as markup), exit 2."""
    console.print(f"[red]error:[/red] {shown(err)}", soft_wrap=True)
    raise typer.Exit(2) from None


@app.callback()
def _check_settings() -> None:
    # Runs before every command: a bad MM15_DTYPE is one line here, not a traceback (chat) or another
    # command's error wherever the compute dtype is first asked for.
    from mm15.hardware import DTYPES

    value = os.environ.get("MM15_DTYPE")
    if value and value not in DTYPES:
        _fail(f"MM15_DTYPE must be one of {sorted(DTYPES)}, got {value!r}")


def plan_table(plan: TilePlan, title: str) -> Table:
    table = Table(title=title, show_header=True)
    for column in ("#", "kind", "row", "col", "top", "left", "marker", "tokens"):
        table.add_column(column)
    for order, tile in enumerate(plan.tiles):
        kind = "overview" if tile.is_overview else "tile"
        table.add_row(
            str(order),
            kind,
            str(tile.row),
            str(tile.col),
            str(tile.top),
            str(tile.left),
            repr(tile.marker),
            str(plan.tokens_per_tile),
        )
    return table


def print_plan(plan: TilePlan, name: str) -> None:
    console.print(f"[bold]{shown(name)}[/bold]: {plan.height}x{plan.width} (height x width)")
    console.print(
        f"  grid {plan.grid[0]}x{plan.grid[1]} (rows x cols), split={plan.split}, "
        f"resized to {plan.resized[0]}x{plan.resized[1]} on a {plan.canvas[0]}x{plan.canvas[1]} canvas, "
        f"padding bottom={plan.padding[0]} right={plan.padding[1]}"
    )
    if plan.overview_resized:
        console.print(f"  overview resized to {plan.overview_resized[0]}x{plan.overview_resized[1]}")
    console.print(f"  {plan.num_tiles} encoder inputs, {plan.num_image_tokens} image tokens")
    console.print(plan_table(plan, title="tiles in prompt order"))


@app.command()
def plan(
    image: Annotated[Path, typer.Argument(help="Image file to plan.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    draw: Annotated[
        Path | None, typer.Option(help="Write a picture of the tiles over the image (PNG or JPEG).")
    ] = None,
    tile: Annotated[int, typer.Option(help="Tile (sub-image) size in pixels.")] = 672,
    nmin: Annotated[int, typer.Option(help="Fewest tiles in a grid.")] = 4,
    nmax: Annotated[int, typer.Option(help="Most tiles in a grid.")] = 9,
    overview: Annotated[str, typer.Option(help="Overview image: after, before or none.")] = "after",
    indicator: Annotated[str, typer.Option(help="Tile markers: index, separators or none.")] = "index",
    tokens_per_tile: Annotated[int, typer.Option(help="Image tokens per tile.")] = 144,
    images_in_sample: Annotated[
        int, typer.Option(help="Images in the sample (MM1.5 splits only when there are fewer than 3).")
    ] = 1,
) -> None:
    """Print an image's tile plan (grid, resize, padding, tiles, markers, tokens)."""
    if images_in_sample < 1:  # the plan's own error would name its image_index, which is no option here
        _fail(f"--images-in-sample must be >= 1 (this image and its sample's others), got {images_in_sample}")
    try:
        cfg = ImagePlanConfig(
            tile_size=tile,
            n_min=nmin,
            n_max=nmax,
            overview=overview,  # type: ignore[arg-type]
            indicator=indicator,
            tokens_per_tile=tokens_per_tile,  # type: ignore[arg-type]
        )
        if draw is not None:
            check_picture_path(draw, "--draw")
        picture = load_image(image)
        result = plan_image(picture.height, picture.width, cfg, images_in_sample=images_in_sample)
    except (ImageError, ValueError) as err:
        _fail(err)
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_plan(result, str(image))
    if draw is not None:
        try:
            draw.parent.mkdir(parents=True, exist_ok=True)
            draw_plan(picture, result).save(draw)
        except OSError as err:  # checked above; this is the folder changing since, or a full disk
            _fail(f"cannot write --draw {draw}: {err.strerror or err}")
        if not json_out:
            console.print(f"drew the plan to {shown(draw)}")


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).")],
    stage: Annotated[str | None, typer.Option(help="Run only this stage (its parent must be done).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue interrupted stages from their last checkpoint.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: the recipe's output_dir).")
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Cut every stage longer than N steps to N, its schedule compressed into them (a quick, "
            "reduced run): the warm-up keeps its share of the stage (warm-up x N / the stage's steps, "
            "rounded half up, at most N - 1) and the cosine reaches its floor on step N, the last one; "
            "stages of N steps or fewer run as written.",
        ),
    ] = None,
    parent: Annotated[
        Path | None,
        typer.Option(help="Fine-tune from this model directory instead of the recipe's (e.g. video.yaml)."),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="Data parallelism under torchrun: auto, none, ddp or fsdp2 (default: the recipe's "
            "'distributed', auto = DDP with several ranks)."
        ),
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            help="Run the start-up checks (recipe, data sources, parents, checkpoints) and print what each "
            "stage would do, without training."
        ),
    ] = False,
) -> None:
    """Train a recipe's stages in order: checkpoints, resume, TensorBoard logs, loss plots, a summary.

    Data-parallel: ``torchrun --nproc_per_node N -m mm15.cli train RECIPE [--strategy fsdp2]``.
    """
    import dataclasses

    from mm15.train import distributed
    from mm15.train.config import load_recipe
    from mm15.train.data import CorruptDataError
    from mm15.train.run import StageFailed, StopRequested, check_recipe, run_recipe

    together = False  # every rank leaves together (finished or stopped): then they wait for each other
    try:
        config = load_recipe(recipe)
        if parent is not None:
            # Re-point the stages that start from a model directory (not init, not an earlier stage).
            names = {s.name for s in config.stages}
            moved = {s.name for s in config.stages if s.parent != "init" and s.parent not in names}
            if not moved:
                raise ValueError(f"--parent: no stage of {config.name!r} starts from a model directory")
            repointed = tuple(
                dataclasses.replace(s, parent=str(parent)) if s.name in moved else s for s in config.stages
            )
            config = dataclasses.replace(config, stages=repointed)
        if max_steps is not None:
            # A stage longer than --max-steps is cut to it, its schedule (warm-up, then the cosine to its
            # floor) compressed into those steps, so a quick run ends decayed as the full one would; a
            # stage no longer than that runs as the recipe has it.
            stages = []
            for s in config.stages:
                if max_steps < s.max_steps:
                    s = dataclasses.replace(
                        s,
                        max_steps=max_steps,
                        save_every=min(s.save_every, max_steps),
                        schedule=s.schedule.compressed(s.max_steps, max_steps),
                    )
                stages.append(s)
            config = dataclasses.replace(config, stages=tuple(stages))
        if check:
            rows = check_recipe(config, stage_name=stage, resume=resume, out=out, strategy=strategy)
            console.print(f"[bold]{shown(config.name)}[/bold]: the checks passed; what each stage would do:")
            for row in rows:  # a block per stage: the sources alone are wider than a terminal
                console.print(f"[bold]{shown(row['stage'])}[/bold]: {shown(row['action'])}")
                console.print(
                    f"  parent {shown(row['parent'])}; {row['steps']} steps; batch {row['batch']} (global = "
                    f"micro x accumulation x ranks); sequence {row['seq_length']}; lr {row['lr']}; trainable "
                    f"{shown(row['trainable'])}",
                    soft_wrap=True,
                )
                console.print(f"  data: {shown(row['sources'])}", soft_wrap=True)
            return
        summaries = run_recipe(config, console, stage_name=stage, resume=resume, out=out, strategy=strategy)
        together = True
    except (ValueError, OSError) as err:  # OSError: an output the start-up checks could not foresee
        _fail(err)
    except (StageFailed, CorruptDataError) as err:
        console.print(f"[red]stopped:[/red] {shown(err)}", soft_wrap=True)
        raise typer.Exit(3) from None
    except StopRequested as err:
        together = True  # the ranks agreed on the signal (StopSignals.agreed)
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for all
            console.print(
                f"[yellow]{shown(err)}.[/yellow] Continue with: {shown(_resume_command())}", soft_wrap=True
            )
        raise typer.Exit(128 + err.signum) from None
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            console.print(
                "[yellow]interrupted.[/yellow] Continue from the last checkpoint with: "
                f"{shown(_resume_command())}",
                soft_wrap=True,
            )
        raise typer.Exit(130) from None
    finally:
        distributed.cleanup(wait=together)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun rank 0 reports
    for s in summaries:
        console.print(
            f"{shown(s['stage'])}: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} over {s['steps']} steps"
        )
        if s["skipped"]:
            console.print(f"  skipped (counted): {shown(s['skipped'])}", soft_wrap=True)
            for example in s.get("skip_examples", []):
                console.print(f"    {shown(example)}", soft_wrap=True)


@app.command("eval")
def eval_(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (save_pretrained / a stage's 'final').")
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            help="Tasks, comma-separated, repeatable: names, categories, 'synth' or 'all'; options after "
            "a colon, e.g. textvqa:path=VAL.json,images=DIR (see docs/evaluation.md)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most N items per task.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Results and cache directory (default: runs/eval/<model name>; <run>-<stage> for a "
            "stage's final model)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.")] = 8,
    list_tasks: Annotated[bool, typer.Option("--list", help="List the registered tasks and exit.")] = False,
) -> None:
    """Evaluate a model on benchmark tasks: cached, resumable; results JSON, Markdown table and chart."""
    from mm15.eval.runner import evaluate, iter_task_table
    from mm15.eval.tasks import TaskError, resolve_task_specs

    if list_tasks:
        table = Table(title="evaluation tasks (* = required option)")
        for column in ("task", "category", "metric", "options", "description"):
            table.add_column(column, overflow="fold", no_wrap=column == "task")
        for row in iter_task_table():
            table.add_row(*row)
        console.print(table)
        return
    try:
        if model is None or not tasks:
            raise ValueError("give --model DIR and --tasks LIST (or --list to see the tasks)")
        resolve_task_specs(tasks)  # a bad task list fails before the model is loaded
        from mm15.model.mm15 import MM15Model

        target = out if out is not None else Path("runs/eval") / model_name_of(model)
        check_output_dir(target, "the results directory")  # before the model load, which takes a while
        loaded = MM15Model.from_pretrained(model)
        report = evaluate(
            loaded,
            tasks,
            limit=limit,
            batch_size=batch_size,
            out_dir=target,
            model_path=model,
            console=console,
        )
    except (TaskError, ValueError, OSError, ImageError) as err:
        _fail(err)
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted.[/yellow] The answers generated so far are cached in the results "
            f"directory; the same command continues from them: mm15 {shown(shlex.join(sys.argv[1:]))}",
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    typer.echo(report.to_markdown())  # raw, so the Markdown table is never wrapped
    console.print(
        f"{report.run['generated_items']} item{'' if report.run['generated_items'] == 1 else 's'} generated, "
        f"{report.run['cached_items']} from the cache; "
        f"results in {shown(target)}/ (results.json, results.md, scores.png)",
        soft_wrap=True,
    )


def _resume_command() -> str:
    """This process's ``mm15`` command line with ``--resume``: --stage, --max-steps and --out carry over.

    Under torchrun, the torchrun command with as many processes: resuming a 2-rank checkpoint on one
    process restarts the data streams per rank, so the losses would no longer repeat the run's.
    """
    again = [a for a in sys.argv[1:] if a != "--no-resume"]
    again += [] if "--resume" in again else ["--resume"]
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        nodes = "" if per_node == str(world) else f" --nnodes {world // int(per_node)} (and your rendezvous)"
        return f"torchrun --nproc_per_node {per_node}{nodes} -m mm15.cli {shlex.join(again)}"
    return f"mm15 {shlex.join(again)}"


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes its outputs.")] = Path("runs/demo"),
    image: Annotated[list[Path] | None, typer.Option(help="Extra real images to include.")] = None,
    recipe: Annotated[Path, typer.Option(help="The recipe to train.")] = Path("recipes/tiny.yaml"),
) -> None:
    """Run the main job at toy scale: image plans, the tiny three-stage recipe, live answers."""
    from mm15.demo import DemoInputError, run_demo
    from mm15.train.run import StopRequested

    command = shlex.join(["mm15", *sys.argv[1:]])
    again = f"The same command ({shown(command)}; make demo runs it) continues from the last checkpoint."
    try:
        run_demo(out, console, image, recipe)
    except DemoInputError as err:
        _fail(err)
    except StopRequested as err:
        console.print(f"[yellow]{shown(err)}.[/yellow] {again}", soft_wrap=True)
        raise typer.Exit(128 + err.signum) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted.[/yellow] {again}", soft_wrap=True)
        raise typer.Exit(130) from None


if __name__ == "__main__":
    app()
