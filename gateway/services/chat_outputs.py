"""What a chat request's output is read for besides its text, decided before the engine sees
it: a forced tool call, tool calls the model may write (tool_choice "auto"), a reasoning
section; and the engine options each needs (a call grammar, special tokens kept, where a
constraint starts)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.engine.client import SamplingOptions
from gateway.engine.reasoning_parsing import ReasoningParsing, ReasoningPlan
from gateway.engine.tool_parsing import AutoToolPlan, ToolCallParsing
from gateway.schemas.openai import ChatCompletionRequest
from gateway.services.auto_tool_calls import auto_call_plan
from gateway.services.reasoning_output import reasoning_plan
from gateway.services.tool_call_checks import CallChecker
from gateway.services.tool_calls import ForcedCall, forced_call_of


@dataclass(frozen=True)
class ChatOutputs:
    options: SamplingOptions
    forced_call: ForcedCall | None
    auto_calls: AutoToolPlan | None
    call_checker: CallChecker | None  # judges the auto calls for loraplex_tool_calls
    reasoning: ReasoningPlan | None


async def plan_chat_outputs(
    body: ChatCompletionRequest,
    prompt: list[int],
    options: SamplingOptions,
    tool_parsing: ToolCallParsing | None,
    reasoning_parsing: ReasoningParsing | None,
) -> ChatOutputs:
    auto_calls = await auto_call_plan(tool_parsing, body, options.constraint)
    if auto_calls is not None:
        options = replace(
            options,
            constraint=auto_calls.constraint,
            skip_special_tokens=auto_calls.skip_special_tokens,
        )
    # After the call plan: its grammar, if any, is the constraint whose start this decides.
    reasoning, ended = await reasoning_plan(reasoning_parsing, body, prompt, options.constraint)
    if reasoning is not None:
        options = replace(options, reasoning_ended=ended, reasoning_switches=reasoning.switches)
    if reasoning is not None and reasoning.split:
        options = replace(
            options,
            skip_special_tokens=options.skip_special_tokens
            and reasoning.parsing.skip_special_tokens,
        )
    return ChatOutputs(
        options,
        forced_call_of(body),
        auto_calls,
        CallChecker(body.tools_for_template() or []) if auto_calls else None,
        reasoning,
    )
