"""Dashboard rows about traffic: overview, per tenant, per adapter and rollout (with shadows)."""

from __future__ import annotations

from dashboard_outcomes import outcome_panels
from dashboard_panels import (
    SCOPE,
    TENANT_ADAPTER,
    Member,
    error_ratio,
    given_up_ratio,
    quantiles,
    table,
    timeseries,
)

# End-to-end latency as the p95 alert reads it: answered requests and those whose client gave
# up (timed until it left, a lower bound); errors and refusals are the error panels'.
WAITED = 'outcome=~"ok|client_closed"'


def shadow_panels(labels: str) -> list[Member]:
    """Shadow mode: a candidate gets copies of the stable's requests; its output is compared
    (divergence) and timed, never shown."""
    return [
        (
            timeseries(
                "Shadow traffic share",
                "Percent of the stable's callers whose requests are mirrored to the shadow "
                "version (0: no shadow).",
                [
                    (
                        f"max by (adapter, version) (loraplex_shadow_percent{{{labels}}})",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="percent",
            ),
            6,
            8,
        ),
        (
            timeseries(
                "Shadow requests by outcome",
                "Mirrored requests per candidate version: match (the stable's tokens exactly), "
                "diverged, error, dropped (over LORAPLEX_SHADOW_MAX_INFLIGHT).",
                [
                    (
                        "sum by (adapter, version, outcome) "
                        f"(rate(loraplex_shadow_requests_total{{{labels}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}} {{outcome}}",
                    )
                ],
                unit="reqps",
                stack=True,
            ),
            6,
            8,
        ),
        (
            timeseries(
                "Shadow divergence",
                "1 - common prefix / longer length of the candidate's and the stable's tokens "
                "(0: identical, 1: different from the first token).",
                quantiles("loraplex_shadow_divergence_ratio", labels, ("adapter", "version")),
                unit="percentunit",
            ),
            6,
            8,
        ),
        (
            timeseries(
                "Shadow p95 TTFT and latency",
                "The candidate's p95 time to first token and end-to-end latency on mirrored "
                "requests, to compare with its stable's panels above.",
                [
                    *(
                        (expr, f"{legend} ttft")
                        for expr, legend in quantiles(
                            "loraplex_shadow_time_to_first_token_seconds",
                            labels,
                            ("adapter", "version"),
                            (0.95,),
                        )
                    ),
                    *(
                        (expr, f"{legend} e2e")
                        for expr, legend in quantiles(
                            "loraplex_shadow_duration_seconds",
                            labels,
                            ("adapter", "version"),
                            (0.95,),
                        )
                    ),
                ],
                unit="s",
            ),
            6,
            8,
        ),
    ]


def overview_row() -> list[Member]:
    """Overview: traffic, errors and latency over all tenants."""
    return [
        (
            timeseries(
                "Requests/s by status",
                "Finished /v1 requests per second by HTTP status (499: the client left).",
                [
                    (
                        "sum by (status) "
                        f"(rate(loraplex_requests_total{{{SCOPE}}}[$__rate_interval]))",
                        "{{status}}",
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
                "Time to first token",
                "Admission to the first generated token, p50 and p95.",
                quantiles("loraplex_time_to_first_token_seconds", SCOPE),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "End-to-end latency",
                "Arrival to last byte of chat/completions, p50 and p95: successful ones and "
                "those the client gave up on, timed until it left (alert: p95 > 10 s per "
                "adapter).",
                quantiles("loraplex_request_duration_seconds", f"{SCOPE}, {WAITED}"),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Tokens/s",
                "Prompt tokens processed and tokens generated per second.",
                [
                    (
                        f"sum(rate(loraplex_prompt_tokens_total{{{SCOPE}}}[$__rate_interval]))",
                        "prompt",
                    ),
                    (
                        f"sum(rate(loraplex_completion_tokens_total{{{SCOPE}}}[$__rate_interval]))",
                        "completion",
                    ),
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "In flight and queued",
                "Admitted generation requests not finished, and those still waiting for "
                "their first token.",
                [
                    (f"sum(loraplex_requests_in_flight{{{TENANT_ADAPTER}}})", "in flight"),
                    (f"sum(loraplex_requests_queued{{{TENANT_ADAPTER}}})", "queued"),
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Time per output token",
                "Mean inter-token latency of a request after its first token, p50 and p95.",
                quantiles("loraplex_time_per_output_token_seconds", SCOPE),
                unit="s",
            ),
            8,
            8,
        ),
    ]


def tenant_row() -> list[Member]:
    """Per tenant: traffic, latency, tokens and limits."""
    return [
        (
            timeseries(
                "Requests/s by tenant",
                'Finished /v1 requests per second per tenant ("" = not authenticated).',
                [
                    (
                        "sum by (tenant) "
                        '(rate(loraplex_requests_total{tenant=~"$tenant"}[$__rate_interval]))',
                        "{{tenant}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "5xx ratio by tenant",
                "Share of each tenant's requests answered with a server error.",
                [(error_ratio("tenant", 'tenant=~"$tenant"'), "{{tenant}}")],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "p95 end-to-end latency by tenant",
                "95th percentile of generations' latency per tenant (successful or given up "
                "by the client).",
                quantiles(
                    "loraplex_request_duration_seconds",
                    f'tenant=~"$tenant", {WAITED}',
                    ("tenant",),
                    (0.95,),
                ),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Generated tokens/s by tenant",
                "Tokens generated per second for each tenant.",
                [
                    (
                        "sum by (tenant) (rate(loraplex_completion_tokens_total"
                        '{tenant=~"$tenant"}[$__rate_interval]))',
                        "{{tenant}}",
                    )
                ],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "In flight by tenant",
                "Admitted generation requests not yet finished, per tenant.",
                [
                    (
                        'sum by (tenant) (loraplex_requests_in_flight{tenant=~"$tenant"})',
                        "{{tenant}}",
                    )
                ],
            ),
            12,
            8,
        ),
    ]


def adapter_row() -> list[Member]:
    """Per adapter and rollout: versions, canaries, rollbacks, shadows."""
    adapter_filter = 'adapter=~"$adapter", version=~"$version"'
    return [
        (
            timeseries(
                "Requests/s by adapter version",
                'Finished requests per adapter version ("" = the base model).',
                [
                    (
                        "sum by (adapter, version) "
                        f"(rate(loraplex_requests_total{{{SCOPE}}}[$__rate_interval]))",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "p95 time to first token by adapter version",
                "What the rollback monitor compares between a canary and its stable version.",
                quantiles(
                    "loraplex_time_to_first_token_seconds", SCOPE, ("adapter", "version"), (0.95,)
                ),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "p95 end-to-end latency by adapter version",
                "95th percentile of generations' latency per adapter version (successful or "
                "given up by the client).",
                quantiles(
                    "loraplex_request_duration_seconds",
                    f"{SCOPE}, {WAITED}",
                    ("adapter", "version"),
                    (0.95,),
                ),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "5xx and 499 ratio by adapter version",
                "Share of requests answered with a server error (alert: > 5 % per adapter), "
                "and share of generations whose client gave up, 499 (alert: > 20 % per "
                "adapter).",
                [
                    (error_ratio("adapter, version", SCOPE), "{{adapter}} v{{version}} 5xx"),
                    (given_up_ratio("adapter, version", SCOPE), "{{adapter}} v{{version}} 499"),
                ],
                unit="percentunit",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Canary traffic share",
                "Percent of an adapter's traffic sent to its canary version (0: no rollout).",
                [
                    (
                        f"max by (adapter, version) (loraplex_rollout_canary_percent"
                        f"{{{adapter_filter}}})",
                        "{{adapter}} v{{version}}",
                    )
                ],
                unit="percent",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Rollout transitions",
                "Cumulative rollout transitions per version and action (start, promote, "
                "pause, resume, complete, rollback) since the gateway started: a step is an "
                "event.",
                [
                    (
                        "sum by (adapter, version, action) "
                        f"(loraplex_rollout_transitions_total{{{adapter_filter}}})",
                        "{{adapter}} v{{version}} {{action}}",
                    )
                ],
            ),
            8,
            8,
        ),
        *shadow_panels(adapter_filter),
        *outcome_panels(adapter_filter),
        (
            table(
                "Rollbacks by reason",
                "Rollbacks since the gateway started, per version and reason (ttft_p95, "
                "latency_p95, error_rate, task_success, safety_incident: automatic; manual: "
                "an operator).",
                f"sum by (adapter, version, reason) (loraplex_rollbacks_total{{{adapter_filter}}})",
                {"adapter": "adapter", "version": "version", "reason": "reason"},
            ),
            24,
            7,
        ),
    ]
