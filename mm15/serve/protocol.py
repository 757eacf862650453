"""Pydantic models of the OpenAI chat-completions request, response and stream-chunk schemas.

What the server accepts, explicitly (``docs/serving.md`` has the table):

* Implemented: ``model``, ``messages`` (string content, or ``text``, ``image_url`` and ``video_url``
  parts; ``video_url`` is vLLM's part for a video, with mm15's optional ``num_frames``),
  ``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop`` (string or list),
  ``seed``, ``n`` (only 1), ``stream``, ``stream_options.include_usage``.
* Accepted and ignored (bookkeeping that does not change the answer): ``user``, ``store``,
  ``metadata``, ``service_tier``, ``parallel_tool_calls``, a message's ``name``, an image's ``detail``,
  and an assistant message's ``refusal``, ``annotations``, ``audio``, ``function_call`` and
  ``tool_calls`` when null or empty (a returned message sent back with ``model_dump()``; its null
  ``content`` counts as "").
* Accepted only at their neutral value (anything else is a 400 naming the field): penalties at 0,
  ``logprobs`` false, ``logit_bias`` empty, ``response_format`` text, no tools or functions,
  ``modalities`` ["text"].
* Any other field is refused with 400 "Unrecognized request argument supplied", as OpenAI does, and
  types are strict: ``"5"`` is not an integer and ``1`` is not a boolean.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; MM1.5's plan decides the tiling


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str
    # An mm15 extension: frames sampled uniformly from the clip (the server's limit when left out).
    num_frames: Annotated[int, Field(ge=1)] | None = None


class VideoPart(_Strict):
    """A video, as vLLM accepts it: ``{"type": "video_url", "video_url": {"url": ...}}``."""

    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


# The fields of an assistant message as the openai client returns it (``ChatCompletionMessage``): a
# returned message sent back with ``message.model_dump()`` carries them, null. They are accepted (and
# ignored) on assistant messages when null or empty; this server has no tools, audio or refusals.
ASSISTANT_EXTRAS = ("refusal", "annotations", "audio", "function_call", "tool_calls")


class Message(_Strict):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    # Null only in an assistant message (as OpenAI allows), where it counts as "".
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None
    name: str | None = None
    refusal: None = None
    annotations: None = None
    audio: None = None
    function_call: None = None
    tool_calls: None = None

    @field_validator("content")
    @classmethod
    def _null_content_only_from_assistants(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        if info.data.get("role") == "assistant":
            return ""
        raise ValueError(
            "content must be a string or a list of parts; only an assistant message's may be null"
        )

    @field_validator(*ASSISTANT_EXTRAS, mode="before")
    @classmethod
    def _assistant_extras_when_empty(cls, value: Any, info: ValidationInfo) -> None:
        if info.data.get("role") != "assistant":
            raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")
        if value is None or (value == [] and info.field_name in ("annotations", "tool_calls")):
            return None
        raise ValueError(
            f"{info.field_name} is not supported (this server has no tools, audio or refusals): it may "
            "only be null" + (" or empty" if info.field_name in ("annotations", "tool_calls") else "")
        )

    @model_validator(mode="after")
    def _images_only_from_users(self) -> Message:
        media = isinstance(self.content, list) and any(
            isinstance(p, ImagePart | VideoPart) for p in self.content
        )
        if self.role != "user" and media:
            raise ValueError(
                f"image and video parts are only allowed in user messages, not in a {self.role} message"
            )
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Strict):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # OpenAI's range: an int64
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Accepted and ignored.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted only at their neutral value.
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    functions: Annotated[list[Any], Field(max_length=0)] | None = None
    function_call: Literal["none"] | None = None
    modalities: list[Literal["text"]] | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> Any:
        # A field validator (``stream`` is declared and checked first), so the error names the field.
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("frequency_penalty", "presence_penalty", mode="before")
    @classmethod
    def _zero_penalty(cls, value: Any) -> Any:
        # 0.0 is the neutral value too; the strict Literal[0] would refuse the float.
        return 0 if isinstance(value, float) and value == 0.0 else value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mm15"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
