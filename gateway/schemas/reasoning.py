"""Chat request fields for reasoning models (LORAPLEX_REASONING_PARSER), with vLLM's names:
whether the reasoning comes back, and the chat template's own switches (Qwen3's
enable_thinking, ...), which reach the template with or without a parser, as in vLLM."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, field_validator
from pydantic_core import PydanticCustomError

# What the gateway itself gives a chat template (the conversation, the tools, the tokenizer's
# own tokens) or transformers reads as options: chat_template_kwargs may set none of them.
GATEWAY_TEMPLATE_ARGUMENTS = frozenset(
    {
        "messages",
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "bos_token",
        "eos_token",
        "pad_token",
        "unk_token",
        "raise_exception",
        "strftime_now",
    }
)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
TrueIfNull = Annotated[
    bool,
    BeforeValidator(
        lambda value: True if value is None else value, json_schema_input_type=bool | None
    ),
]


class ReasoningFields(BaseModel):
    """A base of ChatCompletionRequest (unknown fields accepted, as OpenAI's are)."""

    model_config = ConfigDict(extra="allow")

    include_reasoning: TrueIfNull = True
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: Any = None

    @field_validator("thinking_token_budget")
    @classmethod
    def _no_thinking_budget(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError(
                "unsupported", "loraplex does not support thinking_token_budget yet."
            )
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_switches_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(value or ()) & GATEWAY_TEMPLATE_ARGUMENTS)
        if taken:
            raise PydanticCustomError(
                "template_argument",
                "chat_template_kwargs cannot set {names}: the gateway renders those from the "
                "request itself.",
                {"names": ", ".join(taken)},
            )
        return value

    def template_switches(self) -> dict[str, Any]:
        """chat_template_kwargs with reasoning_effort's, as vLLM passes them: the effort
        itself, and thinking on unless it is "none" (where the client set no enable_thinking
        of its own)."""
        switches = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            switches["reasoning_effort"] = self.reasoning_effort
            switches.setdefault("enable_thinking", self.reasoning_effort != "none")
        return switches
