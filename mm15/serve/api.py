"""The HTTP API: OpenAI-compatible chat completions over an ``Engine``, plus the web page.

``create_app(engine, settings)`` returns a FastAPI app with:

* ``POST /v1/chat/completions``: a whole answer, or with ``stream: true`` server-sent events
  (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``);
* ``GET /v1/models``, ``GET /health`` and ``GET /`` (the web page in ``static/index.html``).

A video is a ``video_url`` content part (vLLM's shape) holding a ``data:video/...;base64,`` URL: the
server samples ``num_frames`` frames uniformly (default and limit ``max_video_frames``) and the prompt
holds them as MM1.5-Video's training samples do, each frame one unsplit image. A request holds either
images or one video.

Every refusal is a 4xx in OpenAI's error shape naming the field and the rule (``mm15.serve.errors``).
The body is parsed by hand rather than by FastAPI's parameter binding so that the size limit applies
while reading, the content type is checked, invalid JSON (including NaN) and schema errors share one
error shape, and nothing is parsed before the API key is checked. Anything unexpected is logged with
its traceback on the server and answered with a bare 500 message; the app keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mm15.model.generate import GenerationConfig
from mm15.model.mm15 import IMAGE_PLACEHOLDER
from mm15.serve.conversation import (
    Turn,
    check_unicode,
    check_user_text,
    defuse_image_slots,
    has_video,
    render_prompt,
)
from mm15.serve.engine import (
    EncodedPrompt,
    Engine,
    EngineBusy,
    EngineStopped,
    Event,
    PromptTooLong,
    RequestHandle,
)
from mm15.serve.errors import APIError, error_body
from mm15.serve.media import image_from_url, video_from_url
from mm15.serve.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ImagePart,
    ModelCard,
    ModelList,
    TextPart,
    Usage,
    VideoPart,
)
from mm15.serve.settings import ServeSettings

log = logging.getLogger("mm15.serve")

MAX_STOP_LENGTH = 256
# No tokenizer packs more than this many characters into a token on real text: a longer text is
# refused before tokenising it (which would hold the tokenizer lock the engine also needs).
CHARACTERS_PER_TOKEN_BOUND = 32
# Pydantic names union branches in error locations ("str", "list[...]"); they are not field names.
_BRANCH_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


def page_html() -> str:
    """The web page shipped as package data."""
    return resources.files("mm15.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def _param(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path: ``messages[0].content[1].image_url.url``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if "[" in item or item in _BRANCH_NAMES:
            continue
        if parts and parts[-1] == f".{item}":  # a tagged union repeats its tag before the field
            continue
        parts.append(f".{item}")
    return "".join(parts).lstrip(".")


def _validation_error(err: ValidationError) -> APIError:
    """The most specific of pydantic's errors (the deepest location) as one clear 400."""
    errors = err.errors(include_url=False)
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'"
    else:
        message = f"Invalid value for '{param}': {first['msg']}"
    return APIError(400, message, param=param or None, code="invalid_value")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, settings: ServeSettings) -> Any:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(
            415,
            "the request body must be JSON with Content-Type: application/json, "
            f"got {content_type or 'none'!r}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    limit = settings.max_body_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"the request body is {declared} bytes, over this server's limit of {limit}",
            code="request_too_large",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(
                413,
                f"the request body is over this server's limit of {limit} bytes",
                code="request_too_large",
            )
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None


def _image_count(request: ChatCompletionRequest) -> int:
    return sum(
        isinstance(part, ImagePart)
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
    )


def _video_parts(request: ChatCompletionRequest) -> list[tuple[str, VideoPart]]:
    """The request's video parts with their JSON paths."""
    return [
        (f"messages[{i}].content[{j}]", part)
        for i, message in enumerate(request.messages)
        if isinstance(message.content, list)
        for j, part in enumerate(message.content)
        if isinstance(part, VideoPart)
    ]


def _num_frames(part: VideoPart, settings: ServeSettings) -> int:
    requested = part.video_url.num_frames
    return settings.max_video_frames if requested is None else requested


def _text_length(request: ChatCompletionRequest) -> int:
    return sum(
        len(message.content)
        if isinstance(message.content, str)
        else sum(len(part.text) for part in message.content if isinstance(part, TextPart))
        for message in request.messages
    )


def _turns(request: ChatCompletionRequest, settings: ServeSettings) -> list[Turn]:
    """OpenAI messages -> turns with decoded images (blocking: image decoding; run in a thread)."""
    turns = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        video = False
        if isinstance(message.content, str):
            pieces, pictures = [(message.content, f"messages[{i}].content")], []
        else:
            pieces, pictures = [], []
            for j, part in enumerate(message.content):
                where = f"messages[{i}].content[{j}]"
                if isinstance(part, ImagePart):
                    pictures.append(image_from_url(part.image_url.url, settings, f"{where}.image_url.url"))
                    pieces.append((IMAGE_PLACEHOLDER, None))
                elif isinstance(part, VideoPart):
                    frames = video_from_url(
                        part.video_url.url, settings, f"{where}.video_url.url", _num_frames(part, settings)
                    )
                    pictures.extend(frames)
                    # The frames back to back, as MM1.5-Video's training samples hold them.
                    pieces.append((IMAGE_PLACEHOLDER * len(frames), None))
                    video = True
                else:
                    pieces.append((part.text, f"{where}.text"))
        for k, (text, where) in enumerate(pieces):
            if where is None:
                continue
            try:
                if role == "assistant":
                    # An earlier answer sent back as the client got it (the openai client's usual
                    # multi-turn pattern): what the model wrote stays text, even "<image>".
                    check_unicode(text, where)
                    pieces[k] = (defuse_image_slots(text), where)
                else:
                    check_user_text(text, where)
            except ValueError as err:
                raise APIError(400, str(err), param=where, code="invalid_value") from None
        # Parts are joined line by line: an image then a text part is "<image>\nquestion", as in training.
        turns.append(Turn(role, "\n".join(text for text, _ in pieces), pictures, video=video))
    return turns


def _check_limits(request: ChatCompletionRequest, settings: ServeSettings) -> None:
    """The limits that need no image or token work, checked before any is done."""
    requested = request.requested_max_tokens()
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if requested is not None and requested > settings.max_tokens_limit:
        raise APIError(
            400,
            f"{param} is {requested}, over this server's limit of {settings.max_tokens_limit}",
            param=param,
            code="max_tokens_too_large",
        )
    stops = request.stop_strings()
    if len(stops) > settings.max_stop_sequences:
        raise APIError(
            400,
            f"at most {settings.max_stop_sequences} stop sequences are allowed, got {len(stops)}",
            param="stop",
            code="invalid_value",
        )
    if any(len(stop) > MAX_STOP_LENGTH for stop in stops):
        raise APIError(
            400,
            f"stop sequences may be at most {MAX_STOP_LENGTH} characters",
            param="stop",
            code="invalid_value",
        )
    images = _image_count(request)
    if images > settings.max_images_per_request:
        raise APIError(
            400,
            f"the request has {images} images, over this server's limit of {settings.max_images_per_request}",
            param="messages",
            code="too_many_images",
        )
    videos = _video_parts(request)
    if len(videos) > 1:
        raise APIError(
            400,
            f"the request has {len(videos)} videos; a request holds at most one (MM1.5-Video reads one clip)",
            param=videos[1][0],
            code="too_many_videos",
        )
    if videos and images:
        raise APIError(
            400,
            "a request holds either images or one video, not both",
            param=videos[0][0],
            code="invalid_value",
        )
    for where, part in videos:
        frames = _num_frames(part, settings)
        if frames > settings.max_video_frames:
            raise APIError(
                400,
                f"{where}.video_url.num_frames is {frames}, over this server's limit of "
                f"{settings.max_video_frames}",
                param=f"{where}.video_url.num_frames",
                code="too_many_frames",
            )
    # Every message costs prompt tokens whatever it holds (the template's role markers), and every
    # content part at least its separator: a body of a million empty messages is refused here, not
    # after rendering and tokenising them (a minute under the tokenizer lock, which every other
    # client's decoding step needs too).
    parts = sum(1 if isinstance(m.content, str) else max(1, len(m.content)) for m in request.messages)
    if max(len(request.messages), parts) > settings.max_prompt_tokens:
        raise APIError(
            400,
            f"the request has {len(request.messages)} messages with {parts} content parts, each of which "
            f"costs prompt tokens: over the prompt limit of {settings.max_prompt_tokens} tokens",
            param="messages",
            code="context_length_exceeded",
        )
    characters = _text_length(request)
    if characters > CHARACTERS_PER_TOKEN_BOUND * settings.max_prompt_tokens:
        raise APIError(
            400,
            f"the messages hold {characters} characters of text, far over the prompt limit of "
            f"{settings.max_prompt_tokens} tokens",
            param="messages",
            code="context_length_exceeded",
        )


def _generation_config(
    request: ChatCompletionRequest, settings: ServeSettings, prompt_tokens: int, context: int | None
) -> GenerationConfig:
    requested = request.requested_max_tokens()
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    room = None if context is None else context - prompt_tokens
    if room is not None and room < 1:
        raise APIError(
            400,
            f"the prompt needs {prompt_tokens} tokens and fills the model's context of {context}",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is not None and room is not None and requested > room:
        raise APIError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus {param} ({requested}) exceed the model's context of "
            f"{context} tokens",
            param=param,
            code="context_length_exceeded",
        )
    max_new = requested if requested is not None else settings.default_max_tokens
    if room is not None:
        max_new = min(max_new, room)
    return GenerationConfig(
        max_new_tokens=max_new,
        # Greedy by default (OpenAI's default is 1.0): a small grounding model answers best greedily.
        temperature=request.temperature if request.temperature is not None else 0.0,
        top_p=request.top_p if request.top_p is not None else 1.0,
        stop=request.stop_strings(),
        seed=request.seed,
    )


def _prepare(
    engine: Engine, request: ChatCompletionRequest, settings: ServeSettings
) -> tuple[EncodedPrompt, GenerationConfig]:
    """Messages -> encoded prompt and generation settings (blocking work: runs in a worker thread)."""
    turns = _turns(request, settings)
    try:
        with engine.tokenizer_lock:
            prompt, images = render_prompt(engine.tokenizer, turns)
    except TemplateError as err:  # e.g. a template that insists on alternating roles
        raise APIError(
            400, f"the model's chat template cannot render these messages: {err}", param="messages"
        ) from None
    try:
        encoded = engine.encode(prompt, images, max_tokens=settings.max_prompt_tokens, video=has_video(turns))
    except PromptTooLong as err:
        raise APIError(400, str(err), param="messages", code="context_length_exceeded") from None
    except ValueError as err:
        raise APIError(400, str(err), param="messages", code="invalid_value") from None
    return encoded, _generation_config(request, settings, encoded.num_tokens, engine.context_length)


def _sse(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``settings`` (start the engine before serving)."""
    app = FastAPI(title="mm15", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings
    started = int(time.time())
    page = page_html()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"unknown path {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return JSONResponse(error_body(message, code=str(err.status_code)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        # The traceback goes to the server's log only; the client learns nothing about the internals.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=err)
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": (
                    "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
                    "script-src 'unsafe-inline'; connect-src 'self'"
                ),
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats
        return {
            "status": "ok",
            "model": settings.model_name,
            "waiting": engine.waiting,
            "requests": stats.requests,
            "prefills": stats.prefills,
            "decode_steps": stats.decode_steps,
            "rows_decoded": stats.rows_decoded,
            "mean_batch": round(stats.mean_batch, 2),
            "largest_batch": stats.largest_batch,
            "cancelled": stats.cancelled,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return ModelList(data=[ModelCard(id=settings.model_name, created=started)]).model_dump()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        document = await _read_json(request, settings)
        if not isinstance(document, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            body = ChatCompletionRequest.model_validate(document)
        except ValidationError as err:
            raise _validation_error(err) from None
        if body.model != settings.model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist here; this server serves {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        _check_limits(body, settings)
        encoded, config = await run_in_threadpool(_prepare, engine, body, settings)
        try:
            handle = engine.submit(encoded, config, loop=asyncio.get_running_loop())
        except EngineBusy as err:
            raise APIError(
                429, f"the server is busy: {err}", type="rate_limit_error", code="server_busy"
            ) from None
        except EngineStopped:
            raise APIError(
                503, "the server is shutting down", type="server_error", code="unavailable"
            ) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream_events(handle, completion_id, created, settings.model_name, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        # The whole answer, unless the client leaves first: then its row is cancelled at once rather
        # than generated to the end for nobody.
        answer = asyncio.ensure_future(_whole_answer(handle))
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not answer.done():
                answer.cancel()
            handle.cancel()  # a no-op once finished; frees the batch row if the request was abandoned
        if not answer.done():
            log.info("the client left before its answer was complete; its row is cancelled")
            return Response(status_code=499)  # nobody reads it: the connection is gone
        text, event = answer.result()
        if event.kind == "error":
            raise APIError(500, event.text, type="server_error", code="generation_failed")
        usage = Usage(
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            total_tokens=event.prompt_tokens + event.completion_tokens,
        )
        completion = ChatCompletion(
            id=completion_id,
            created=created,
            model=settings.model_name,
            choices=[Choice(message=AssistantMessage(content=text), finish_reason=event.finish_reason)],
            usage=usage,
        )
        return JSONResponse(completion.model_dump())

    return app


async def _whole_answer(handle: RequestHandle) -> tuple[str, Event]:
    """A handle's text and its final event (``done`` or ``error``)."""
    text: list[str] = []
    async for event in handle.aevents():
        if event.kind == "delta":
            text.append(event.text)
        else:
            return "".join(text), event
    raise RuntimeError("the request ended without a final event")  # pragma: no cover - aevents() ends on one


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives before that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _stream_events(
    handle: RequestHandle, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events for one streamed completion; a disconnect cancels the request's row."""

    def chunk(delta: Delta, finish: Any = None, usage: Usage | None = None, empty: bool = False) -> str:
        choices = [] if empty else [ChunkChoice(delta=delta, finish_reason=finish)]
        document = ChatCompletionChunk(
            id=completion_id, created=created, model=model, choices=choices, usage=usage
        ).model_dump()
        for choice in document["choices"]:  # a delta names only what it carries, as OpenAI's do
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
        return _sse(document)

    try:
        yield chunk(Delta(role="assistant", content=""))
        async for event in handle.aevents():
            if event.kind == "delta":
                yield chunk(Delta(content=event.text))
            elif event.kind == "error":
                yield _sse(error_body(event.text, type="server_error", code="generation_failed"))
            else:
                yield chunk(Delta(), finish=event.finish_reason)
                if include_usage:
                    usage = Usage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        total_tokens=event.prompt_tokens + event.completion_tokens,
                    )
                    yield chunk(Delta(), usage=usage, empty=True)
        yield _sse("[DONE]")
    finally:
        handle.cancel()
