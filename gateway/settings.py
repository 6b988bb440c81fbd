"""All loraplex settings: one pydantic-settings model read from `LORAPLEX_*` variables."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.engine_settings import EngineSettings
from kernels.vllm_plugin import ADMISSION_ENV, DEMAND_ENV

ENV_PREFIX = "LORAPLEX_"
DEMO_DIR_NAME = "demo"
DEMO_TENANT = "demo"
# Levels both the logging module and uvicorn know (uvicorn's "trace" is not a logging level).
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# A bearer token short enough to guess, or a placeholder like "x", is refused at start.
MIN_TOKEN_CHARS = 16
# The shipped manifests' placeholders (deploy/k8s/secret.yaml, deploy/compose): public, so only
# demo mode may keep them.
PLACEHOLDER_TOKEN_PREFIX = "change-me"
# LORAPLEX_* names read by something other than Settings: the admin CLI and clients (URL, KEY),
# the vLLM plugin in the engine's processes, compose interpolation, the PostgreSQL tests.
OTHER_ENV_NAMES = frozenset(
    {
        f"{ENV_PREFIX}URL",
        f"{ENV_PREFIX}KEY",
        ADMISSION_ENV,
        DEMAND_ENV,
        f"{ENV_PREFIX}MODELS_DIR",
        f"{ENV_PREFIX}HTTP_PORT",
        f"{ENV_PREFIX}BIND_ADDRESS",  # compose: the host address ports are published on
        f"{ENV_PREFIX}TEST_POSTGRES_URL",
    }
)


class Settings(EngineSettings, BaseSettings):
    """Built once by the app factory or the CLI, never at import time. The engine's fields
    are EngineSettings' (gateway.engine_settings)."""

    # Errors never echo a value: a refused one may be a token or a database URL's password.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Idle keep-alive connections are closed after this long. Longer than a load balancer's
    # idle timeout (60 s on common ones), so the balancer, not the gateway, closes them: a
    # close racing a request on a reused connection is a client-side "server disconnected".
    http_keep_alive_s: int = Field(75, gt=0)
    # SIGTERM: /readyz answers 503 for shutdown_drain_s while requests are still served (load
    # balancers take a few seconds to stop sending), then in-flight requests get
    # shutdown_grace_s to finish. Kubernetes' terminationGracePeriodSeconds must exceed both.
    shutdown_drain_s: float = Field(5.0, ge=0, le=600)
    shutdown_grace_s: int = Field(50, gt=0, le=3600)
    data_dir: Path = Path(".loraplex")
    log_level: str = Field("INFO", description=f"One of {LOG_LEVELS} (any case; WARN = WARNING).")
    log_json: bool = False

    # Base model: any HF checkpoint directory. Unset → the demo base under data_dir/demo.
    base_model: Path | None = None
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model; defaults to the folder name."
    )
    # Bulk import at start-up: each subfolder a PEFT adapter (name = folder name), registered
    # through the compatibility gate to `import_tenant` unless the name already exists.
    adapter_dir: Path | None = None
    import_tenant: str = "default"
    import_api_key: SecretStr | None = Field(
        None,
        description="An operator-chosen key for import_tenant, registered at start-up if new "
        "(scripted set-ups: benchmarks, CI).",
    )
    demo: bool = Field(
        False,
        description="Create and register the demo model and adapters, both for tenant `demo` "
        "(not combinable with adapter_dir). Off, start-up revokes the keys demo mode issued.",
    )
    demo_api_key: SecretStr | None = Field(
        None,
        description="Demo mode's API key for tenant `demo`; unset → a random key each start.",
    )

    # Registry.
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default sqlite+aiosqlite under data_dir."
    )
    artifact_dir: Path | None = Field(None, description="Artifact store; default data_dir.")
    artifact_store: str | None = Field(
        None,
        description="s3://bucket/prefix for an S3-compatible artifact store (extra `s3`); "
        "artifact_dir then only caches downloads.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO...).")
    s3_region: str | None = None
    s3_import_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets adapters may be registered from by s3:// URI (empty: none).",
    )
    upload_max_bytes: int = Field(2 * 1024**3, gt=0)
    max_request_bytes: int = Field(
        16 * 1024**2,
        gt=0,
        description="Largest request body of any route but the adapter upload (refused 413 "
        "before it is read whole).",
    )
    # Rollback monitor defaults; an adapter's card and its admin override take precedence.
    # The card's and the admin override's range: fewer than 10 requests would let one or two
    # slow requests decide a rollback.
    rollout_window: int = Field(
        100, ge=10, le=100_000, description="Requests per sliding window (10-100000)."
    )
    rollout_max_error_rate: float = Field(0.001, ge=0, lt=1)
    rollout_margin_ms: float = Field(15.0, ge=0, description="Allowed p95 above the card's SLA.")
    rollout_max_p95_ttft_ms: float | None = Field(None, gt=0, description="Absolute bound.")
    rollout_max_p95_e2e_ms: float | None = Field(None, gt=0, description="Absolute bound.")
    rollout_min_task_success: float | None = Field(
        0.9,
        ge=0,
        le=1,
        description="Roll back below this share of successful feedback over a window "
        "(seed: 90 %); empty or 0: feedback only counts.",
    )
    rollout_min_tool_call_validity: float | None = Field(
        0.95,
        ge=0,
        le=1,
        description="Roll back below this share of valid tool calls (tool_choice auto) over "
        "a window (seed: tool < 95 %); empty or 0: only counted.",
    )
    rollout_auto_promote: bool = Field(
        False, description="Promote a canary one stage after each healthy full window."
    )
    shadow_max_inflight: int = Field(
        4,
        ge=0,
        description="Mirrored requests to one adapter's shadow version running at once per "
        "process; more are dropped and counted (0 mirrors nothing).",
    )
    drift_sample_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of adapter requests whose prompt perplexity is measured for drift "
        "(gateway/prompt_drift.py; such a request reads no prefix cache). 0: off.",
    )
    drift_max_prompt_tokens: int = Field(
        512,
        ge=1,
        # vLLM's start-up memory profile leaves prompt logits out: 4096 tokens of a 152k
        # vocabulary are ~6 GB for a moment.
        le=4096,
        description="Longest prompt sampled for drift: its logprobs take prompt tokens x "
        "vocabulary of engine memory in one step.",
    )
    drift_reference_samples: int = Field(
        200,
        ge=10,
        le=1_000_000,
        description="Without a card's drift.dev_perplexity, a version's first this many sampled "
        "prompts on a replica are its reference.",
    )
    enable_faults: bool = Field(
        False, description="Mount /admin/v1/faults (latency/error injection per version)."
    )
    rollout_poll_interval_s: float = Field(
        0.5,
        gt=0,
        description="How often each replica reloads changed rollouts from the registry and "
        "checks its change generation (dropping cached names and keys when it moved).",
    )
    catalog_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        description="The longest a model-name resolution or a verified key is reused. Changes "
        "made through any replica drop the caches within rollout_poll_interval_s (the "
        "registry's change generation, gateway/registry_watch.py); this bounds the rest. "
        "While the registry cannot be reached, entries keep answering up to 10x this (at "
        "most 600 s) past it (gateway/registry_outage.py); what none answers is a 503.",
    )
    import_roots: list[Path] = Field(
        default_factory=list, description="Local roots adapters may be registered from by path."
    )

    limits_redis_url: SecretStr | None = Field(
        None,
        description="redis://, rediss:// or unix:// URL of a Redis every replica shares: tenant "
        "limits then hold for the deployment as a whole (gateway/shared_limits.py). Unset: "
        "each replica enforces them on its own. While it cannot be reached, each replica "
        "falls back to its own.",
    )
    limits_redis_prefix: str = Field(
        "loraplex",
        pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="Key prefix in that Redis, so deployments sharing one Redis keep apart.",
    )

    prefix_cache_scope: Literal["tenant", "shared"] = Field(
        "tenant",
        description="tenant: a prompt reuses cached prefixes only of its own tenant's requests "
        "(a cache hit's speed would tell a tenant what another sent); shared: across tenants "
        "(more hits on common system prompts, for tenants that trust each other).",
    )
    admin_token: SecretStr | None = Field(
        None,
        description=f"Bearer token of the admin API ({MIN_TOKEN_CHARS}+ visible ASCII "
        "characters; a shipped change-me placeholder only in demo mode); unset or blank, the "
        "admin API is disabled.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token Prometheus sends for /metrics (the admin token works too); "
        "with neither set, /metrics is open.",
    )
    feedback_secret: SecretStr | None = Field(
        None,
        description="Signs response ids so POST /v1/feedback knows which adapter version "
        f"served a response; the same on every replica ({MIN_TOKEN_CHARS}+ visible ASCII "
        "characters). Unset: a random one per process, and feedback is accepted only by the "
        "replica that answered, until it restarts.",
    )
    feedback_max_age_s: int = Field(
        7 * 24 * 3600,
        gt=0,
        le=10 * 366 * 24 * 3600,  # the registry keeps verdicts this long: years, not forever
        description="Feedback on a response older than this is refused (default 7 days, at "
        "most 10 years); the registry keeps each verdict this long.",
    )
    evaluate_requires_report: bool = Field(
        False,
        description="Marking a version evaluated needs an eval report from `loraplex eval run` "
        "whose gates pass (seed: no promotion past evaluated without gate results); false: an "
        "operator's reason is enough, a report is checked when given.",
    )
    # Details of these three: README (settings table, "Eval contamination").
    echo_logprobs_max_prompt_tokens: int = Field(
        8192, ge=1, le=131_072, description="Most prompt tokens one echo with logprobs scores."
    )
    evaluate_requires_ngram_filters: bool = Field(
        False, description="Evaluate needs a report checked against every card dataset's filter."
    )
    ngram_filter_max_bytes: int = Field(  # at most registry.ngram_filter.MAX_BITS / 8
        64 * 1024**2, gt=0, le=512 * 1024**2, description="Largest dataset n-gram filter."
    )

    @field_validator(
        "admin_token",
        "metrics_token",
        "feedback_secret",
        "demo_api_key",
        "import_api_key",
        "rollout_min_task_success",
        "rollout_min_tool_call_validity",
        "tool_call_parser",
        "reasoning_parser",
        "limits_redis_url",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `LORAPLEX_ADMIN_TOKEN=` (or an empty Secret value) must not become a token of no
        # characters: that one would match a bare `Authorization: Bearer`.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and not text.strip():
            return None
        return value

    @field_validator("admin_token", "metrics_token", "feedback_secret")
    @classmethod
    def _token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # Clients' headers are compared stripped, so a token read with a newline still matches.
        token = value.get_secret_value().strip()
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"a token needs at least {MIN_TOKEN_CHARS} characters (or unset it)")
        # Starlette decodes headers as latin-1, so a UTF-8 token could never match; spaces and
        # controls do not survive every client and proxy either.
        if not all("!" <= c <= "~" for c in token):
            raise ValueError("a token may hold only visible ASCII characters (no spaces)")
        return SecretStr(token)

    @field_validator("limits_redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        url = value.get_secret_value().strip()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            # The URL may carry a password: the message never repeats it.
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        try:
            from redis.connection import parse_url

            parse_url(url)
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc.__class__.__name__})") from None
        return SecretStr(url)

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_log_level(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        level = value.strip().upper()
        level = "WARNING" if level == "WARN" else level
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    @model_validator(mode="after")
    def _no_placeholder_tokens(self) -> Settings:
        if self.demo:
            return self
        for name in ("admin_token", "metrics_token", "feedback_secret"):
            token: SecretStr | None = getattr(self, name)
            if token is not None and token.get_secret_value().startswith(PLACEHOLDER_TOKEN_PREFIX):
                raise ValueError(
                    f"LORAPLEX_{name.upper()} is a shipped placeholder "
                    f"({PLACEHOLDER_TOKEN_PREFIX}...): set a real secret (e.g. `openssl rand "
                    "-hex 32`), or LORAPLEX_DEMO=true for a local demo"
                )
        if self.limits_redis_url is not None:
            from redis.connection import parse_url

            password = parse_url(self.limits_redis_url.get_secret_value()).get("password", "")
            if password.startswith(PLACEHOLDER_TOKEN_PREFIX):
                raise ValueError(
                    "LORAPLEX_LIMITS_REDIS_URL holds the shipped placeholder password "
                    f"({PLACEHOLDER_TOKEN_PREFIX}...): set the Redis password you deployed"
                )
        return self

    @model_validator(mode="after")
    def _demo_owns_its_import(self) -> Settings:
        # Demo mode's key reaches whatever is imported with it: production adapters imported
        # beside the demo would be readable with the demo key.
        if self.demo and self.adapter_dir is not None:
            raise ValueError(
                "demo mode serves the demo adapters to tenant `demo` and cannot import "
                "LORAPLEX_ADAPTER_DIR: unset one of LORAPLEX_DEMO and LORAPLEX_ADAPTER_DIR"
            )
        return self

    @property
    def demo_root(self) -> Path:
        return self.data_dir / DEMO_DIR_NAME

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'registry.db').resolve()}"

    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    def resolved_import_tenant(self) -> str:
        return DEMO_TENANT if self.demo else self.import_tenant

    def resolved_base_model(self) -> Path:
        from gateway.demo import demo_paths

        return self.base_model or demo_paths(self.demo_root).base

    def resolved_adapter_dir(self) -> Path | None:
        from gateway.demo import ADAPTERS_DIR_NAME

        if self.adapter_dir is not None:
            return self.adapter_dir
        if self.base_model is None:
            return self.demo_root / ADAPTERS_DIR_NAME
        return None

    def resolved_model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.base_model is None:
            return "loraplex-demo-base"
        return self.base_model.resolve().name


def unknown_environment(environ: Iterable[str]) -> list[str]:
    """LORAPLEX_* names in `environ` that nothing reads: Settings ignore them, so a misspelt
    one (LORAPLEX_MAX_LORA) would silently leave its setting at the default."""
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | OTHER_ENV_NAMES
    return sorted(
        name
        for name in environ
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )
