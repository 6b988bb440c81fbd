"""Dashboard panels about what callers got: their verdicts (POST /v1/feedback), whether their
prompts drifted from what the adapter was made for, whether constrained outputs came out whole,
whether the tool calls models wrote were valid, and loops the guard stopped."""

from __future__ import annotations

from dashboard_panels import Member, timeseries


def outcome_panels(adapter_filter: str) -> list[Member]:
    return [
        (
            timeseries(
                "Feedback by outcome",
                "Callers' verdicts (POST /v1/feedback) per version: success, failure, "
                "human_override, user_correction, schema_failure, false_refusal, "
                "safety_incident.",
                [
                    (
                        "sum by (adapter, version, outcome) "
                        f"(rate(loraplex_feedback_total{{{adapter_filter}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}} {{outcome}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Task success (feedback)",
                "Share of success among success and failure verdicts per version over the "
                "last hour (LoraplexTaskSuccessLow: under 90 % of at least 100).",
                [
                    (
                        "sum by (adapter, version) (increase(loraplex_feedback_total"
                        f'{{{adapter_filter}, outcome="success"}}[1h])) / '
                        "sum by (adapter, version) (increase(loraplex_feedback_total"
                        f'{{{adapter_filter}, outcome=~"success|failure"}}[1h]))',
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Prompt drift",
                "Per version, its sampled prompts' perplexity over the last 24 hours divided by "
                "its reference (card drift.dev_perplexity, else its first sampled prompts), "
                "highest replica, with its limit (LoraplexPromptDrift: above it for 1 h).",
                [
                    (
                        "max by (adapter, version) "
                        f"(loraplex_prompt_drift_ratio{{{adapter_filter}}})",
                        "{{adapter}} v{{version}}",
                    ),
                    (
                        "max by (adapter, version) "
                        f"(loraplex_prompt_drift_limit_ratio{{{adapter_filter}}})",
                        "{{adapter}} v{{version}} limit",
                    ),
                ],
                unit="none",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Prompt perplexity",
                "Perplexity of each version's sampled prompts under it (LORAPLEX_DRIFT_SAMPLE_"
                "RATE): window 24h, and its reference.",
                [
                    (
                        "max by (adapter, version, window) "
                        f"(loraplex_prompt_perplexity{{{adapter_filter}}})",
                        "{{adapter}} v{{version}} {{window}}",
                    )
                ],
                unit="none",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Structured outputs cut short",
                "Share of sequences under a structured-output constraint (response_format, "
                "structured_outputs, forced tool calls) that max_tokens or a stop sequence "
                "ended before the constraint did: their text does not match it.",
                [
                    (
                        "sum by (adapter, version, kind) (rate(loraplex_constrained_outputs_total"
                        f'{{{adapter_filter}, ended=~"max_tokens|stop_sequence"}}'
                        "[$__rate_interval])) / "
                        "sum by (adapter, version, kind) (rate(loraplex_constrained_outputs_total"
                        f"{{{adapter_filter}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}} {{kind}}",
                    )
                ],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Tool calls valid",
                "Share of the calls each version wrote under tool_choice auto that name a "
                "function the caller gave with arguments matching its parameters "
                "(LoraplexToolCallsInvalid: under 95 % of at least 100 in an hour).",
                [
                    (
                        # 1 - invalid share: a version with no valid call has no valid series.
                        "1 - sum by (adapter, version) (rate(loraplex_tool_calls_total"
                        f'{{{adapter_filter}, outcome!="valid"}}[$__rate_interval])) / '
                        "sum by (adapter, version) (rate(loraplex_tool_calls_total"
                        f"{{{adapter_filter}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Loops stopped",
                "Sequences the loop guard ended (finish_reason repetition: one token n-gram "
                "repeated min_count times in a row) per version: an adapter that loops.",
                [
                    (
                        "sum by (adapter, version) "
                        f"(rate(loraplex_loop_stops_total{{{adapter_filter}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
    ]
