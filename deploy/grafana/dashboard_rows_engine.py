"""Dashboard rows about the engine side: residency and paging, engine, tenancy and admin."""

from __future__ import annotations

from dashboard_panels import (
    Member,
    quantiles,
    stat,
    timeseries,
)


def residency_row() -> list[Member]:
    """Residency and paging: host cache and device pool."""
    return [
        (
            timeseries(
                "Adapters resident by tier",
                "Adapters held in the engine's host cache and in device pool pages.",
                [("sum by (tier) (loraplex_adapters_resident)", "{{tier}}")],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Resident adapter bytes by tier",
                "Bytes of adapter weights held per tier.",
                [("sum by (tier) (loraplex_adapter_resident_bytes)", "{{tier}}")],
                unit="bytes",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Adapter loads/s by result",
                "Loads of adapter versions into the engine by result: ok, error.",
                [
                    (
                        "sum by (result) (rate(loraplex_adapter_loads_total"
                        '{adapter=~"$adapter"}[$__rate_interval]))',
                        "{{result}}",
                    )
                ],
                unit="ops",
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Adapter load latency",
                "Time to load one adapter version into the engine, p50 and p95.",
                quantiles("loraplex_adapter_load_duration_seconds", ""),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Adapter bytes loaded/s",
                "Adapter weight bytes loaded into the engine per second (paging traffic).",
                [("sum(rate(loraplex_adapter_load_bytes_total[$__rate_interval]))", "loaded")],
                unit="Bps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Evictions/s by tier and reason",
                "Adapters dropped from a tier: capacity (made room), retired (version retired).",
                [
                    (
                        "sum by (tier, reason) "
                        "(rate(loraplex_adapter_evictions_total[$__rate_interval]))",
                        "{{tier}} {{reason}}",
                    )
                ],
                unit="ops",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Device pool pages",
                "Pages of the paged adapter pool (LORAPLEX_PAGED_LORA) in use and free per layer "
                "group (a group whose free pages stay near zero binds residency); empty when "
                "the engine keeps vLLM's own slot buffers.",
                [("sum by (group, state) (loraplex_adapter_pool_pages)", "{{group}} {{state}}")],
                stack=True,
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Device page-ins/outs and bytes in",
                "Adapters copied into and dropped from the device pool per second, and the "
                "bytes copied in (paging traffic between host and device).",
                [
                    ("sum(rate(loraplex_adapter_page_ins_total[$__rate_interval]))", "page-ins"),
                    ("sum(rate(loraplex_adapter_page_outs_total[$__rate_interval]))", "page-outs"),
                    (
                        "sum(rate(loraplex_adapter_page_in_bytes_total[$__rate_interval]))",
                        "bytes in/s",
                    ),
                ],
                unit="ops",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Residency wait",
                "How long requests held back by the paged pool's admission waited for their "
                "adapter's pages (p50, p95), and how many waited per second. Rising waits mean "
                "the pool is too small for the active adapter set (LORAPLEX_PAGED_POOL_BYTES).",
                [
                    *quantiles("loraplex_adapter_residency_wait_seconds", ""),
                    (
                        "sum(rate(loraplex_adapter_residency_wait_seconds_count"
                        "[$__rate_interval]))",
                        "waits/s",
                    ),
                ],
                unit="s",
            ),
            8,
            8,
        ),
    ]


def engine_row() -> list[Member]:
    """Engine: vLLM health, batch and queue."""
    return [
        (
            stat(
                "Engine up",
                "1 while the embedded vLLM engine answers its health probe (alert after 1 m at 0).",
                "min(loraplex_engine_up)",
                steps=[(None, "red"), (1, "green")],
            ),
            4,
            8,
        ),
        (
            timeseries(
                "Engine requests running and waiting",
                "vLLM's own view: sequences in the running batch and in its waiting queue.",
                [
                    ("sum(vllm:num_requests_running)", "running"),
                    ("sum(vllm:num_requests_waiting)", "waiting"),
                ],
            ),
            10,
            8,
        ),
        (
            timeseries(
                "KV cache usage",
                "Share of the engine's KV cache blocks in use (1 = full: requests wait or are "
                "preempted).",
                [("max(vllm:kv_cache_usage_perc)", "kv cache")],
                unit="percentunit",
            ),
            10,
            8,
        ),
        (
            timeseries(
                "Engine tokens/s",
                "Prompt and generation tokens per second as counted by vLLM.",
                [
                    ("sum(rate(vllm:prompt_tokens_total[$__rate_interval]))", "prompt"),
                    ("sum(rate(vllm:generation_tokens_total[$__rate_interval]))", "generation"),
                ],
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine time to first token",
                "vLLM's TTFT (from its own arrival), p50 and p95: compare with the gateway's "
                "to see time spent before the engine.",
                quantiles("vllm:time_to_first_token_seconds", ""),
                unit="s",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Engine preemptions/s",
                "Sequences preempted for lack of KV cache.",
                [("sum(rate(vllm:num_preemptions_total[$__rate_interval]))", "preemptions")],
                unit="ops",
            ),
            8,
            8,
        ),
    ]


def tenancy_row() -> list[Member]:
    """Tenancy and admin: keys, auth failures, registry operations."""
    return [
        (
            timeseries(
                "Rate-limited requests/s by tenant and limit",
                "Requests refused by a tenant limit (requests_per_second, tokens_per_minute, "
                "max_concurrent, max_tokens).",
                [
                    (
                        "sum by (tenant, limit) (rate(loraplex_rate_limited_total"
                        '{tenant=~"$tenant"}[$__rate_interval]))',
                        "{{tenant}} {{limit}}",
                    )
                ],
                unit="reqps",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Auth failures/s by reason",
                "Refused credentials: missing, malformed, unknown, revoked, expired, admin "
                "(wrong admin token).",
                [
                    (
                        "sum by (reason) (rate(loraplex_auth_failures_total[$__rate_interval]))",
                        "{{reason}}",
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
                "Registry writes/s by operation and result",
                "Admin API writes: register, retire, delete, tenant and key management.",
                [
                    (
                        "sum by (operation, result) "
                        "(rate(loraplex_registry_operations_total[$__rate_interval]))",
                        "{{operation}} {{result}}",
                    )
                ],
                unit="ops",
            ),
            8,
            8,
        ),
        (
            timeseries(
                "Shared limits store: replicas up, fallbacks/s, errors/s",
                "Replicas that reach the Redis behind LORAPLEX_LIMITS_REDIS_URL. While one "
                "cannot, it admits under its own limits (fallbacks): a tenant can then get "
                "up to replicas x its policy. No series: the setting is unset.",
                [
                    ("sum(loraplex_limit_store_up)", "replicas up"),
                    ("count(loraplex_limit_store_up == 0)", "replicas down"),
                    (
                        "sum(rate(loraplex_limit_store_fallbacks_total[$__rate_interval]))",
                        "fallback admissions/s",
                    ),
                    (
                        "sum by (operation) "
                        "(rate(loraplex_limit_store_errors_total[$__rate_interval]))",
                        "errors/s {{operation}}",
                    ),
                ],
            ),
            12,
            8,
        ),
        (
            timeseries(
                "Shared limits store: admission round trip",
                "One admission's script on the limits store, as each request waits for it.",
                quantiles("loraplex_limit_store_admission_seconds", "", qs=(0.5, 0.95, 0.99)),
                unit="s",
            ),
            12,
            8,
        ),
    ]
