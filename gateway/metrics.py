"""Every loraplex metric, declared once. Prefix `loraplex_`, units in the names.

Labels are bounded by construction: `tenant`, `adapter` and `version` come from the registry
(names validated by regex, a few thousand at most), `route`, `status`, `reason`, `limit`,
`tier`, `result`, `operation`, `outcome`, `kind` and `ended` from small fixed sets in code.
Never a prompt, a request id or a joined list. Requests for the base model carry adapter=""
and version="".

Several workers: when PROMETHEUS_MULTIPROC_DIR is set, prometheus-client writes every value to
per-process files and /metrics aggregates them (see routes/metrics.py); gauges declare how.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# From 5 ms (GPU decode) to 2 min (long CPU generations): one bucket set fits both.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SCOPE = ("tenant", "adapter", "version")

# --- requests -----------------------------------------------------------------------------
REQUESTS = Counter(
    "loraplex_requests",
    "Finished /v1 requests by caller scope, route and HTTP status.",
    [*SCOPE, "route", "status"],
)
REQUEST_DURATION = Histogram(
    "loraplex_request_duration_seconds",
    "End-to-end latency of /v1 generation requests, arrival to last byte (outcome: ok; "
    "client_closed: the client gave up (499), timed until it left; error: 5xx). Refusals "
    "(4xx) are not timed.",
    [*SCOPE, "route", "outcome"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_time_to_first_token_seconds",
    "Admission to the first generated token.",
    SCOPE,
    buckets=LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "loraplex_time_per_output_token_seconds",
    "Mean inter-token latency of one request after its first token.",
    SCOPE,
    buckets=TOKEN_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", SCOPE)
COMPLETION_TOKENS = Counter("loraplex_completion_tokens", "Tokens generated.", SCOPE)
REQUESTS_IN_FLIGHT = Gauge(
    "loraplex_requests_in_flight",
    "Admitted /v1 generation requests not yet finished.",
    ["tenant", "adapter"],
    multiprocess_mode="livesum",
)
REQUESTS_QUEUED = Gauge(
    "loraplex_requests_queued",
    "Admitted requests still waiting for their first token (queue depth seen by callers).",
    ["tenant", "adapter"],
    multiprocess_mode="livesum",
)

# --- tenancy ------------------------------------------------------------------------------
RATE_LIMITED = Counter(
    "loraplex_rate_limited",
    "Requests refused by a tenant limit (limit: requests_per_second, tokens_per_minute, "
    "max_concurrent, max_tokens).",
    ["tenant", "limit"],
)
AUTH_FAILURES = Counter(
    "loraplex_auth_failures",
    "Refused credentials (reason: missing, malformed, unknown, revoked, expired, admin, metrics).",
    ["reason"],
)

# --- adapters in the engine ---------------------------------------------------------------
ADAPTERS_RESIDENT = Gauge(
    "loraplex_adapters_resident",
    "Adapters held per tier (host: engine CPU cache, device: pool pages in use).",
    ["tier"],
    multiprocess_mode="livesum",
)
ADAPTER_RESIDENT_BYTES = Gauge(
    "loraplex_adapter_resident_bytes",
    "Bytes of adapter weights held per tier.",
    ["tier"],
    multiprocess_mode="livesum",
)
ADAPTER_LOADS = Counter(
    "loraplex_adapter_loads",
    "Adapter loads into the engine (result: ok, error).",
    ["adapter", "version", "result"],
)
ADAPTER_LOAD_DURATION = Histogram(
    "loraplex_adapter_load_duration_seconds",
    "Time to load one adapter version into the engine.",
    buckets=LOAD_BUCKETS,
)
ADAPTER_LOAD_BYTES = Counter(
    "loraplex_adapter_load_bytes", "Adapter weight bytes loaded into the engine."
)
ADAPTER_POOL_PAGES = Gauge(
    "loraplex_adapter_pool_pages",
    "Pages of the engine's paged adapter pool per layer group (group: qkv_proj, o_proj, ...; "
    "state: used, free); pages of different groups differ in size. Absent without paged mode.",
    ["group", "state"],
    multiprocess_mode="livesum",
)
ADAPTER_PAGE_INS = Counter(
    "loraplex_adapter_page_ins", "Adapters copied into the device pool (paged mode)."
)
ADAPTER_PAGE_OUTS = Counter(
    "loraplex_adapter_page_outs", "Adapters dropped from the device pool (paged mode)."
)
ADAPTER_PAGE_IN_BYTES = Counter(
    "loraplex_adapter_page_in_bytes", "Adapter weight bytes copied into the device pool."
)
ADAPTER_RESIDENCY_WAIT = Histogram(
    "loraplex_adapter_residency_wait_seconds",
    "Time a request waited for its adapter's pages in the device pool (paged mode): from the "
    "first step admission held it back to the step that started it. Requests that never "
    "waited are not observed.",
    buckets=LATENCY_BUCKETS,
)
ADAPTER_EVICTIONS = Counter(
    "loraplex_adapter_evictions",
    "Adapters dropped from a tier (reason: capacity, retired).",
    ["tier", "reason"],
)

# --- rollout ------------------------------------------------------------------------------
ROLLOUT_CANARY_PERCENT = Gauge(
    "loraplex_rollout_canary_percent",
    "Share of an adapter's traffic sent to its canary version (no series when none).",
    ["adapter", "version"],
    multiprocess_mode="mostrecent",
)
ROLLOUT_TRANSITIONS = Counter(
    "loraplex_rollout_transitions",
    "Rollout transitions (action: start, promote, pause, resume, complete, rollback, abort, "
    "stable_fallback, stable_restore, fallback_refused, shadow_start, shadow_stop).",
    ["adapter", "version", "action"],
)
ROLLBACKS = Counter(
    "loraplex_rollbacks",
    "Automatic and manual rollbacks (reason: ttft_p95, latency_p95, error_rate, task_success, "
    "safety_incident, manual).",
    ["adapter", "version", "reason"],
)

FEEDBACK = Counter(
    "loraplex_feedback",
    "Callers' verdicts on served responses (POST /v1/feedback), by the version that served "
    "them; outcome: success, failure, human_override, user_correction, schema_failure, "
    "false_refusal, safety_incident.",
    [*SCOPE, "outcome"],
)

# --- structured outputs ------------------------------------------------------------------
CONSTRAINED_OUTPUTS = Counter(
    "loraplex_constrained_outputs",
    "Sequences generated under a structured-output constraint (response_format, "
    "structured_outputs, a forced tool call, tool_choice auto's tag for strict tools or one "
    "call), by how they "
    "ended. kind: json, json_object, regex, choice, grammar, structural_tag. ended: complete "
    "(the constraint's end: the text matches it); "
    "max_tokens, stop_sequence (a stop string or, with the guidance backend, a stop token "
    "the client sent) or repetition (the loop guard): cut before it, the text does not "
    "match; other.",
    [*SCOPE, "kind", "ended"],
)

TOOL_CALLS = Counter(
    "loraplex_tool_calls",
    "Calls the model wrote under tool_choice auto, as the tool-call parser found them, by "
    "outcome: valid (a function it was given, arguments a JSON object matching its "
    "parameters), unknown_function, invalid_arguments, malformed (a call marker the parser "
    "read no call from). Calls the bounded judge could not decide are not counted.",
    [*SCOPE, "outcome"],
)

LOOP_STOPS = Counter(
    "loraplex_loop_stops",
    "Sequences the loop guard ended (finish_reason repetition: the same token n-gram repeated "
    "min_count times in a row), by the version that generated them.",
    SCOPE,
)

# --- shadow (a candidate version mirrored the stable's requests; its output discarded) ----
# Divergence: 0 = the candidate generated the stable's tokens exactly, 1 = from the first token.
DIVERGENCE_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
SHADOW_PERCENT = Gauge(
    "loraplex_shadow_percent",
    "Share of an adapter's stable callers whose requests are mirrored to its shadow version "
    "(no series when none).",
    ["adapter", "version"],
    multiprocess_mode="mostrecent",
)
SHADOW_REQUESTS = Counter(
    "loraplex_shadow_requests",
    "Mirrored requests per candidate version (outcome: match, diverged, error, dropped: over "
    "the in-flight cap).",
    ["adapter", "version", "outcome"],
)
SHADOW_DIVERGENCE = Histogram(
    "loraplex_shadow_divergence_ratio",
    "1 - common prefix / longer length of the candidate's and the stable's generated tokens "
    "(first choice; the mean over a request's prompts).",
    ["adapter", "version"],
    buckets=DIVERGENCE_BUCKETS,
)
SHADOW_TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_shadow_time_to_first_token_seconds",
    "A mirrored request's start to the candidate's first token.",
    ["adapter", "version"],
    buckets=LATENCY_BUCKETS,
)
SHADOW_DURATION = Histogram(
    "loraplex_shadow_duration_seconds",
    "A mirrored request's start to the candidate's last token.",
    ["adapter", "version"],
    buckets=LATENCY_BUCKETS,
)

# --- prompt drift (gateway/prompt_drift.py) ------------------------------------------------
PROMPT_PERPLEXITY = Gauge(
    "loraplex_prompt_perplexity",
    "Perplexity of an adapter version's sampled prompts under it: window 24h (the last 24 "
    "hours on this replica) or reference (its card's dev set, else its first sampled prompts).",
    ["adapter", "version", "window"],
    multiprocess_mode="liveall",
)
PROMPT_DRIFT_RATIO = Gauge(
    "loraplex_prompt_drift_ratio",
    "An adapter version's prompt perplexity over the last 24 hours divided by its reference "
    "(set once the window holds at least 100 sampled prompts).",
    ["adapter", "version"],
    multiprocess_mode="liveall",
)
PROMPT_DRIFT_LIMIT = Gauge(
    "loraplex_prompt_drift_limit_ratio",
    "The drift ratio above which an adapter version's traffic has drifted (its card's "
    "drift.max_ratio, else 1.5).",
    ["adapter", "version"],
    multiprocess_mode="liveall",
)

# --- engine and registry ------------------------------------------------------------------
ENGINE_UP = Gauge(
    "loraplex_engine_up",
    "1 while the engine answers its health probe, else 0.",
    multiprocess_mode="liveall",
)
LIMIT_STORE_UP = Gauge(
    "loraplex_limit_store_up",
    "1 while the shared limits store (LORAPLEX_LIMITS_REDIS_URL) answers, else 0: each "
    "replica then enforces tenant limits on its own. No series when the setting is unset "
    "(hence the label: an unlabelled gauge is exported as 0 from the start).",
    ["store"],
    multiprocess_mode="liveall",
)
LIMIT_STORE_ERRORS = Counter(
    "loraplex_limit_store_errors",
    "Failed calls to the shared limits store (operation: admit, release, renew).",
    ["operation"],
)
LIMIT_STORE_FALLBACKS = Counter(
    "loraplex_limit_store_fallbacks",
    "Requests admitted under this replica's own limits because the limits store was unreachable.",
)
LIMIT_STORE_ADMISSION_DURATION = Histogram(
    "loraplex_limit_store_admission_seconds",
    "Round trip of one admission to the shared limits store.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
REGISTRY_OPERATIONS = Counter(
    "loraplex_registry_operations",
    "Registry writes through the admin API (operation: register, retire, delete, "
    "tenant_create, key_create, key_revoke, limits_update, share, unshare, stack, truncate; "
    "result: ok, refused, error).",
    ["operation", "result"],
)
