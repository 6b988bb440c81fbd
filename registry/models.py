"""ORM models (SQLAlchemy 2.0 typed style). Schema changes go through registry/migrations.

Relationships to the "one" side load eagerly (joined) so objects returned by the service can be
read after their session closes; collections are `lazy="raise"`: query them explicitly.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    event,
    false,
    inspect,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from registry.states import VersionState, Visibility

JSONType = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite returns naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _enum(cls: type[VersionState] | type[Visibility], name: str) -> Enum:
    # Stored as plain strings (no native PG enum): adding a state later is a code change only.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSONType,
        list[str]: JSONType,
        datetime: UTCDateTime,
    }


class BaseModel(Base):
    """A base checkpoint, pinned by the sha256 of its weight files."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    weights_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    tokenizer_sha256: Mapped[str] = mapped_column(String(64))
    model_type: Mapped[str] = mapped_column(String(64))
    hidden_size: Mapped[int]
    intermediate_size: Mapped[int]
    num_layers: Mapped[int]
    num_heads: Mapped[int]
    num_kv_heads: Mapped[int]
    head_dim: Mapped[int]
    vocab_size: Mapped[int]
    # {"q_proj": [in_features, out_features], ...}
    modules: Mapped[dict[str, Any]]
    special_tokens: Mapped[list[str]]
    weight_files: Mapped[list[str]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    # The tenant's policy (rate, token and concurrency limits; base-model access), as written by
    # registry.tenancy.TenantPolicy.to_stored(); None → no limits. API keys: the api_keys table.
    limits: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Adapter(Base):
    """A named line of versions, owned by one tenant and bound to one base."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), index=True
    )
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"))
    visibility: Mapped[Visibility] = mapped_column(_enum(Visibility, "visibility"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Rollout state, written by registry.service.rollout (see registry.rollout for what each
    # field means to the gateway). stable_version is also pinned when a second version is
    # registered and moved when the stable is retired (registry.service.adapters, lifecycle);
    # None (one version, or none servable) or not servable → the newest servable version serves.
    stable_version: Mapped[int | None]
    canary_version: Mapped[int | None]
    canary_percent: Mapped[int | None]  # 1, 10 or 50 while a canary runs, else None
    # The candidate that gets a copy of the requests of `shadow_percent` % of the stable's
    # callers (its output discarded, only compared); None without a shadow.
    shadow_version: Mapped[int | None]
    shadow_percent: Mapped[int | None]  # 1..100 while a shadow runs, else None
    rollout_paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The last rollout's phase: "canary" (running), "complete" or "rolled_back".
    rollout_stage: Mapped[str | None] = mapped_column(String(32))
    # Admin-set fallback for a breaching stable version; None → the stable card's rollback_path.
    rollback_path: Mapped[str | None] = mapped_column(String(80))
    # Where the stable's traffic goes while it is in fallback ("base" or "name@N"), else None.
    active_target: Mapped[str | None] = mapped_column(String(80))
    # Admin override of the monitor thresholds (registry.rollout.Thresholds field names).
    rollout_thresholds: Mapped[dict[str, Any] | None]
    rolled_back_version: Mapped[int | None]
    rolled_back_at: Mapped[datetime | None]
    # Bumped by every rollout write; gateway replicas poll max() of it to notice changes.
    rollout_updated_at: Mapped[datetime | None] = mapped_column(index=True)

    tenant: Mapped[Tenant] = relationship(lazy="joined", innerjoin=True)
    base_model: Mapped[BaseModel] = relationship(lazy="joined", innerjoin=True)


class AdapterVersion(Base):
    """One immutable artifact of an adapter; only `state` ever changes."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="RESTRICT"))
    version: Mapped[int]
    artifact_sha256: Mapped[str] = mapped_column(String(64), index=True)
    rank: Mapped[int]
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean)
    target_modules: Mapped[list[str]]
    dtype: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    peft_config: Mapped[dict[str, Any]]
    card: Mapped[dict[str, Any] | None]
    state: Mapped[VersionState] = mapped_column(_enum(VersionState, "version_state"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapter: Mapped[Adapter] = relationship(lazy="joined", innerjoin=True)

    @property
    def scale(self) -> float:
        """PEFT's LoRA scaling: alpha/r, or alpha/√r for rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)


class ApiKey(Base):
    """A tenant's API key. Only the sha256 of its secret is stored; `key_id` is the public part
    embedded in the key (`lpx_<key_id>_<secret>`), so a lookup needs no scan and logs can name a
    key without holding it. Keys are never deleted: revoking sets `revoked_at`."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), index=True
    )
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str | None] = mapped_column(String(200))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(500))

    tenant: Mapped[Tenant] = relationship(lazy="joined", innerjoin=True)


class AdapterShare(Base):
    """A private adapter made usable by one more tenant (besides its owner). A pure link row:
    it goes when either side goes."""

    __tablename__ = "adapter_shares"
    __table_args__ = (UniqueConstraint("adapter_id", "tenant_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    # Indexed for "what is shared with tenant T" (the unique constraint serves adapter lookups).
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only record of every admin action (who, what, on what, when, with which details)."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_target_at", "target", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any]]


class RolloutEvent(Base):
    """Append-only history of one adapter's rollouts: every start, promotion, pause, rollback
    and fallback, with the window figures that triggered an automatic one."""

    __tablename__ = "rollout_events"
    __table_args__ = (Index("ix_rollout_events_adapter_id_at", "adapter_id", "at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="RESTRICT"))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    # start, promote, complete, pause, resume, rollback, stable_fallback, stable_restore
    action: Mapped[str] = mapped_column(String(32))
    from_version: Mapped[int | None]
    to_version: Mapped[int | None]
    # Where traffic went when not to a version of this adapter ("base", "other@3").
    target: Mapped[str | None] = mapped_column(String(80))
    percent: Mapped[int | None]
    reason: Mapped[str | None] = mapped_column(String(500))
    # {"samples", "p95_ttft_ms", "p95_e2e_ms", "error_rate", ...} of the judged window.
    figures: Mapped[dict[str, Any] | None]
    automatic: Mapped[bool] = mapped_column(Boolean)
    actor: Mapped[str] = mapped_column(String(200))


class FeedbackVerdict(Base):
    """The verdict a caller gave one response (POST /v1/feedback), the first one recorded by
    any replica: keyed by the sha256 of the response id, so no id, prompt or output is stored.
    Rows older than the feedback window are pruned (an expired id is refused before it is
    looked up)."""

    __tablename__ = "feedback_verdicts"

    response_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(32))
    recorded_at: Mapped[datetime] = mapped_column(index=True)
    # A random token of the call that recorded it: a caller whose commit raised can tell
    # whether its row was written anyway (its answer lost) or another call's was.
    recorded_by: Mapped[str] = mapped_column(String(32))


class DatasetNgramFilter(Base):
    """A Bloom filter of one training dataset's 8-word n-grams (registry/ngram_filter.py),
    keyed by the dataset's sha256 as Adaptation Cards list it: eval suites are checked against
    the datasets a version's card names before it is marked evaluated. Holds no text. Replaced
    whole when registered again."""

    __tablename__ = "dataset_ngram_filters"

    dataset_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    ngram_words: Mapped[int] = mapped_column(Integer)
    hash_count: Mapped[int] = mapped_column(Integer)
    bit_count: Mapped[int] = mapped_column(BigInteger)
    # Measured from the bits when registered (the builder's counts are not relied on).
    false_positive_rate: Mapped[float] = mapped_column(Float)
    # The builder's report: n-grams inserted, texts, lines and bytes of the dataset file.
    ngrams: Mapped[int] = mapped_column(BigInteger)
    texts: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(BigInteger)
    dataset_bytes: Mapped[int] = mapped_column(BigInteger)
    bits: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    registered_by: Mapped[str] = mapped_column(String(200))


MUTABLE_VERSION_COLUMNS = frozenset({"state", "state_changed_at"})


@event.listens_for(AdapterVersion, "before_update")
def _versions_are_immutable(
    mapper: Mapper[AdapterVersion], connection: Any, target: AdapterVersion
) -> None:
    state = inspect(target)
    changed = {
        attr.key
        for attr in state.attrs
        if attr.key in mapper.columns and attr.history.has_changes()
    }
    if changed - MUTABLE_VERSION_COLUMNS:
        raise ValueError(f"adapter versions are immutable; tried to change {sorted(changed)}")


@event.listens_for(AuditEntry, "before_update")
def _audit_is_append_only(mapper: Mapper[AuditEntry], connection: Any, target: AuditEntry) -> None:
    raise ValueError("the audit log is append-only")


@event.listens_for(RolloutEvent, "before_update")
def _rollout_events_are_append_only(
    mapper: Mapper[RolloutEvent], connection: Any, target: RolloutEvent
) -> None:
    raise ValueError("rollout events are append-only")


@event.listens_for(FeedbackVerdict, "before_update")
def _verdicts_are_final(mapper: Mapper[FeedbackVerdict], connection: Any, target: Any) -> None:
    raise ValueError("a recorded verdict is final")
