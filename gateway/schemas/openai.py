"""OpenAI wire schemas for requests. Unknown fields are accepted (and ignored) as OpenAI does."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16
# The seed crosses into vLLM's engine core msgpack-encoded: a larger one failed there as a 500
# counted against the adapter version. int64, as vLLM's own server bounds it.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS = 100


def _null_means(default: Any) -> Any:
    """OpenAI types these fields "X or null" and its clients send null for an explicit None:
    null means the default, and the field keeps its plain type for the code that reads it."""
    return lambda value: default if value is None else value


FalseIfNull = Annotated[
    bool, BeforeValidator(_null_means(False), json_schema_input_type=bool | None)
]
Choices = Annotated[int, Field(ge=1, le=MAX_N)]
ChoicesOrNull = Annotated[
    Choices, BeforeValidator(_null_means(1), json_schema_input_type=Choices | None)
]
# Token id (a string, as OpenAI has it) → bias added to its logit. Whether the ids are in the
# vocabulary is the service's check: only it knows the tokenizer.
LogitBias = dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]]


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIModel):
    include_usage: FalseIfNull = False


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None


class SamplingFields(OpenAIModel):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: ChoicesOrNull = 1
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    stream: FalseIfNull = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM server extension, used by load generators to get fixed-length outputs.
    ignore_eos: FalseIfNull = False

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: FalseIfNull = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # None: left out, and the service applies OpenAI's default of 16 under the key's limits
    # (a default here looked client-sent: a key capped below 16 was refused for it).
    max_tokens: int | None = Field(None, ge=1)
    echo: FalseIfNull = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value
