"""OpenAI wire schemas for requests. Unknown fields are accepted (and ignored) as OpenAI does;
known fields loraplex cannot honour yet are refused, never ignored: a client that asked for a
tool call must not get plain text with a 200. Structured outputs: gateway.schemas.structured;
tools: gateway.schemas.tools."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.engine.client import OutputConstraint
from gateway.schemas.loop_guard import RepetitionDetection
from gateway.schemas.reasoning import ReasoningFields
from gateway.schemas.structured import ResponseFormat, StructuredOutputs
from gateway.schemas.tools import (
    MAX_TOOLS,
    NamedToolChoice,
    ToolCall,
    ToolChoice,
    ToolDefinition,
    forced_call_constraint,
    forced_call_schema,
)

MAX_STOP_SEQUENCES = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16
# The seed crosses into vLLM's engine core msgpack-encoded: a larger one failed there as a 500
# counted against the adapter version. int64, as vLLM's own server bounds it.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS = 100
# Each prompt of a list becomes its own engine request and task. OpenAI documents 2048 as the
# most inputs one embeddings request may carry; the same cap bounds completions' prompt lists.
MAX_PROMPTS = 2048
# JSON's \ud800-style escapes can encode half a UTF-16 pair, which json.loads keeps as a lone
# surrogate: not Unicode text, so the tokenizer (and vLLM's msgpack) fail on it with a 500.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _null_means(default: Any) -> Any:
    """OpenAI types these fields "X or null" and its clients send null for an explicit None:
    null means the default, and the field keeps its plain type for the code that reads it."""
    return lambda value: default if value is None else value


def _unsupported(what: str) -> PydanticCustomError:
    # A custom error: its message reaches the client as written, with no "Value error, ".
    return PydanticCustomError("unsupported", f"loraplex does not support {what} yet.")


def _text(value: str) -> str:
    if _LONE_SURROGATE.search(value):
        raise PydanticCustomError(
            "unpaired_surrogate",
            "Text must be valid Unicode: it contains an unpaired UTF-16 surrogate.",
        )
    return value


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
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError(
                "tool_calls_role", "Only assistant messages carry tool_calls."
            )
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError(
                "tool_call_id_missing", "A tool message needs the tool_call_id it answers."
            )
        return self

    @field_validator("content")
    @classmethod
    def _valid_content(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        for text in [value] if isinstance(value, str) else [p.text for p in value or ()]:
            _text(text)
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return None if value is None else _text(value)

    def text(self) -> str:
        """The content as one string; text parts joined by newlines, as vLLM's server does."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it (vLLM passes `name` through too; an
        empty tool_calls list is no call, and vLLM drops it too)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.for_template() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


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
    response_format: ResponseFormat | None = None
    # vLLM server extensions, bounded as vLLM's SamplingParams checks them. ignore_eos: load
    # generators use it to get fixed-length outputs.
    ignore_eos: FalseIfNull = False
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)  # 0 or -1: no top-k
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, le=INT64_MAX)  # at most max_tokens: the service's check
    stop_token_ids: list[StrictInt] | None = None  # in the vocabulary: the service's check
    structured_outputs: StructuredOutputs | None = None
    repetition_detection: RepetitionDetection | None = None  # None: the deployment's guard

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        for text in [value] if isinstance(value, str) else value or ():
            if not text:
                # vLLM refuses it too, but only once the engine has the request.
                raise PydanticCustomError("empty_stop", "Stop sequences must not be empty.")
            _text(text)
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream", True):
            raise PydanticCustomError(
                "stream_options", "stream_options is only allowed when stream is true."
            )
        return value

    @field_validator("structured_outputs")
    @classmethod
    def _one_way_to_constrain(
        cls, value: StructuredOutputs | None, info: ValidationInfo
    ) -> StructuredOutputs | None:
        given = info.data.get("response_format")
        if value is not None and given is not None and given.type != "text":
            raise PydanticCustomError(
                "two_constraints",
                "Send either response_format or structured_outputs, not both.",
            )
        return value

    def output_constraint(self) -> OutputConstraint | None:
        """What the output must match, from whichever field the client set."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        if self.response_format is not None:
            return self.response_format.constraint()
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields, ReasoningFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: FalseIfNull = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    parallel_tool_calls: bool | None = None  # before tool_choice: its check reads it
    # Validated even when left out: with tools, OpenAI's default is "auto".
    tool_choice: ToolChoice | None = Field(None, validate_default=True)
    # OpenAI's deprecated forms of tools and tool_choice.
    functions: list[Any] | None = None
    function_call: Any = None
    _forced_call: OutputConstraint | None = PrivateAttr(None)

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in value or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("duplicate_tool", "Tool names must be distinct.")
        return value or None  # an empty list is no tools

    @field_validator("tool_choice")
    @classmethod
    def _a_call_loraplex_can_make(
        cls, value: ToolChoice | None, info: ValidationInfo
    ) -> ToolChoice | None:
        tools: list[ToolDefinition] | None = info.data.get("tools")
        if value in (None, "auto", "none"):  # "auto" with tools: the service's parser
            return value
        if not tools:
            raise PydanticCustomError(
                "tool_choice_without_tools", "tool_choice asks for a call but tools is empty."
            )
        if isinstance(value, NamedToolChoice) and value.function.name not in {
            t.function.name for t in tools
        }:
            raise PydanticCustomError(
                "unknown_tool",
                "tool_choice names the function {name!r}, which is not in tools.",
                {"name": value.function.name},
            )
        given = info.data.get("response_format")
        if info.data.get("structured_outputs") is not None or (
            given is not None and given.type != "text"
        ):
            raise PydanticCustomError(
                "two_constraints",
                "A forced tool call is already constrained to the tools' schema: send no "
                "response_format or structured_outputs with it.",
            )
        # Here, not only in the model's check, so that an error about it names the field.
        schema = forced_call_schema(tools, value, info.data.get("parallel_tool_calls"))
        forced_call_constraint(schema or {})
        return value

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise _unsupported("functions (deprecated: send tools)")
        return value

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, value: Any) -> Any:
        if value not in (None, "none", "auto"):
            raise _unsupported("function_call (deprecated: send tool_choice)")
        return value

    @model_validator(mode="after")
    def _forced_call_schema(self) -> ChatCompletionRequest:
        schema = forced_call_schema(self.tools or [], self.tool_choice, self.parallel_tool_calls)
        if schema is not None:
            self._forced_call = forced_call_constraint(schema)
        return self

    def forced_call(self) -> NamedToolChoice | Literal["required"] | None:
        """The call the request forces: a named function, any of the tools, or none."""
        if self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice
        return None

    def wants_auto_calls(self) -> bool:
        """Tools the model may call or not, as it decides (OpenAI's default with tools)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def output_constraint(self) -> OutputConstraint | None:
        return self._forced_call or super().output_constraint()

    def tools_for_template(self) -> list[dict[str, Any]] | None:
        return [tool.for_template() for tool in self.tools] if self.tools else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def max_tokens_param(self) -> str:
        """The field the client set the completion budget with, for errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"


class CompletionRequest(SamplingFields):
    # Strict ints: JSON's true and false are not token ids 1 and 0.
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    # None: left out, and the service applies OpenAI's default of 16 under the key's limits
    # (a default here looked client-sent: a key capped below 16 was refused for it).
    max_tokens: int | None = Field(None, ge=1)
    echo: FalseIfNull = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _text(value)
        if not value:
            raise ValueError("prompt must not be an empty list")
        if not isinstance(value[0], int):  # a list of prompts, not one prompt's token ids
            if len(value) > MAX_PROMPTS:
                raise PydanticCustomError(
                    "too_many_prompts",
                    "prompt may hold at most {limit} prompts; got {count}.",
                    {"limit": MAX_PROMPTS, "count": len(value)},
                )
            for item in value:
                if isinstance(item, str):
                    _text(item)
        return value
