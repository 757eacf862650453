"""The ``mm15 chat`` and ``mm15 serve`` commands (registered on the main app in ``mm15.cli``).

Only typer is imported here: torch, the model and the web stack load when a command runs, so the
rest of the CLI starts as fast as before.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import Annotated

import typer


def chat(
    model: Annotated[Path, typer.Option(help="Model directory (written by MM15Model.save_pretrained).")],
    prompt: Annotated[
        str | None, typer.Argument(help="Ask this and exit; without it, chat interactively.")
    ] = None,
    image: Annotated[
        list[Path] | None, typer.Option(help="An image for the first question (repeat for several).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy; higher samples.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    out: Annotated[Path, typer.Option(help="Where answers with boxes or points are drawn (PNG).")] = Path(
        "runs/chat"
    ),
    max_images: Annotated[int, typer.Option(min=0, help="Most images in a conversation.")] = 4,
    video: Annotated[
        Path | None, typer.Option(help="A video for the first question (its frames, as MM1.5-Video).")
    ] = None,
    frames: Annotated[
        int, typer.Option(min=1, help="Frames sampled uniformly from a video (MM1.5-Video: 24).")
    ] = 24,
) -> None:
    """Chat with a model: streams answers, draws boxes and points from the answer on the image."""
    from mm15.model.generate import GenerationConfig
    from mm15.serve.terminal import run_chat

    try:
        config = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    except ValueError as err:  # a seed out of range, a temperature of nan or inf
        raise typer.BadParameter(str(err)) from None
    code = run_chat(model, prompt, list(image or []), config, out, max_images, video, frames)
    if code:
        raise typer.Exit(code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model: Annotated[Path, typer.Option(help="Model directory (written by MM15Model.save_pretrained).")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MM15_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or $MM15_API_KEY)."
        ),
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option(help="Fetch http(s) image URLs (the server then fetches any address it is sent).")
    ] = False,
    allow_local_files: Annotated[
        bool, typer.Option(help="Read file:// URLs and paths (any image file this user can read).")
    ] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests decoded together.")] = 8,
    model_name: Annotated[
        str | None, typer.Option(help="Model id in the API (default: from the directory's name).")
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest request body.")] = None,
    max_image_bytes: Annotated[int | None, typer.Option(help="Largest image file.")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="Most pixels per image.")] = None,
    max_images: Annotated[int | None, typer.Option(help="Most images per request.")] = None,
    max_video_bytes: Annotated[int | None, typer.Option(help="Largest video file.")] = None,
    max_video_frames: Annotated[
        int | None, typer.Option(help="Frames sampled from a video (default and most a request may ask).")
    ] = None,
    max_video_decode_pixels: Annotated[
        int | None, typer.Option(help="Most pixels decoded for one video (frames decoded x frame pixels).")
    ] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Most prompt tokens (images included).")
    ] = None,
    max_tokens_limit: Annotated[
        int | None, typer.Option(help="Largest max_tokens a request may ask.")
    ] = None,
) -> None:
    """Serve a model: OpenAI-compatible /v1/chat/completions, /v1/models, /health and a web page at /."""
    from mm15.paths import model_name_of
    from mm15.serve.server import BindError, serve_model_dir
    from mm15.serve.settings import ServeSettings

    limits = {
        "max_body_bytes": max_body_bytes,
        "max_image_bytes": max_image_bytes,
        "max_image_pixels": max_image_pixels,
        "max_images_per_request": max_images,
        "max_video_bytes": max_video_bytes,
        "max_video_frames": max_video_frames,
        "max_video_decode_pixels": max_video_decode_pixels,
        "max_prompt_tokens": max_prompt_tokens,
        "max_tokens_limit": max_tokens_limit,
    }
    given = {name: value for name, value in limits.items() if value is not None}
    if max_tokens_limit is not None:  # a lower cap lowers the default answer length with it
        given["default_max_tokens"] = min(ServeSettings.default_max_tokens, max_tokens_limit)
    try:
        settings = ServeSettings(
            model_name=model_name or model_name_of(model),
            api_key=api_key,
            allow_remote_images=allow_remote_images,
            allow_local_files=allow_local_files,
            **given,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(2) from None
    if not _is_loopback(host) and api_key is None:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach this address can use it",
            file=sys.stderr,
        )
    try:
        serve_model_dir(model, settings, host, port, max_batch=max_batch)
    except BindError as err:  # from binding, before the model is loaded
        print(f"error: cannot listen on {host}:{port}: {err}", file=sys.stderr)
        raise typer.Exit(2) from None
    except (ValueError, OSError) as err:  # the model directory's, once the address is bound
        print(f"error: cannot load the model: {err}", file=sys.stderr)
        raise typer.Exit(2) from None
