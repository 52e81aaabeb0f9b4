"""The request bodies the server accepts (OpenAI's fields kvtrim honours, plus its ``kvtrim`` block).

Unknown fields are ignored, as OpenAI-compatible servers do, so stock clients work unchanged; a
field kvtrim cannot honour (``n`` > 1, ``logprobs``) is refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class KVTrimOptions(BaseModel):
    """The ``kvtrim`` extra body field: the spec of this request, or a stored context to answer from."""

    model_config = ConfigDict(extra="forbid")
    spec: str | None = None
    context_id: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="kvtrim generates one choice per request")
    logprobs: bool | int | None = Field(default=None)
    kvtrim: KVTrimOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> None:
        if value:
            raise ValueError("kvtrim does not return logprobs")
        return None

    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationFields):
    prompt: str

    def token_limit(self) -> int | None:
        return self.max_tokens


class ContextRequest(BaseModel):
    """``POST /v1/contexts``: a document (``text``, or ``messages`` whose leading part is kept)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    messages: list[Message] | None = None
    spec: str | None = None
