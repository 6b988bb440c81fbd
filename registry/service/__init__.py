"""The registry's service layer: keyword-only async functions the gateway calls.

Write functions are one transaction each: they commit on success (with their audit row) and
roll back on error. Read functions never commit. Objects returned stay readable after the
session closes (expire_on_commit=False, many-to-one relations loaded eagerly).
"""

from registry.service.adapters import register_adapter_version
from registry.service.audit import change_generation, list_audit
from registry.service.base_models import (
    get_base_model,
    get_served_base,
    list_base_models,
    register_base_model,
)
from registry.service.dataset_filters import (
    NgramFilterNotFound,
    delete_ngram_filter,
    get_ngram_filter_info,
    load_ngram_filters,
    read_ngram_filter,
    register_ngram_filter,
)
from registry.service.feedback import prune_verdicts, record_verdict, verdict_of
from registry.service.keys import (
    IssuedKey,
    Principal,
    authenticate_api_key,
    create_api_key,
    list_api_keys,
    revoke_api_key,
)
from registry.service.lifecycle import (
    delete_version,
    deleted_artifacts,
    mark_evaluated,
    removed_versions,
    retire_version,
)
from registry.service.lineage import (
    DerivedVersion,
    TrainedOn,
    card_datasets,
    dataset_digest,
    versions_derived_from,
    versions_trained_on,
)
from registry.service.queries import (
    get_adapter,
    get_version,
    list_adapters,
    list_versions,
    rank_profile,
    version_address,
)
from registry.service.resolve import (
    ResolvedAdapter,
    list_resolvable,
    resolve_adapter,
    resolve_rollout_version,
)
from registry.service.rollout import (
    pause_rollout,
    promote,
    resume_rollout,
    rollback,
    start_rollout,
)
from registry.service.rollout_fallback import restore_stable, set_rollback_path, set_thresholds
from registry.service.rollout_shadow import start_shadow, stop_shadow
from registry.service.rollout_views import (
    list_rollout_events,
    list_rollouts,
    rollout_generation,
    rollout_stamps,
    rollout_status,
)
from registry.service.shares import list_adapter_shares, share_adapter, unshare_adapter
from registry.service.stacking import (
    StackPart,
    refuse_stack,
    resolve_stack,
    stack_card,
    stacking_problems,
)
from registry.service.tenants import (
    change_tenant_policy,
    create_tenant,
    get_tenant,
    list_tenants,
    update_tenant_policy,
)

__all__ = [
    "DerivedVersion",
    "IssuedKey",
    "NgramFilterNotFound",
    "Principal",
    "ResolvedAdapter",
    "StackPart",
    "TrainedOn",
    "authenticate_api_key",
    "card_datasets",
    "change_generation",
    "change_tenant_policy",
    "create_api_key",
    "create_tenant",
    "dataset_digest",
    "delete_ngram_filter",
    "delete_version",
    "deleted_artifacts",
    "get_adapter",
    "get_base_model",
    "get_ngram_filter_info",
    "get_served_base",
    "get_tenant",
    "get_version",
    "list_adapter_shares",
    "list_adapters",
    "list_api_keys",
    "list_audit",
    "list_base_models",
    "list_resolvable",
    "list_rollout_events",
    "list_rollouts",
    "list_tenants",
    "list_versions",
    "load_ngram_filters",
    "mark_evaluated",
    "pause_rollout",
    "promote",
    "prune_verdicts",
    "rank_profile",
    "read_ngram_filter",
    "record_verdict",
    "refuse_stack",
    "register_adapter_version",
    "register_base_model",
    "register_ngram_filter",
    "removed_versions",
    "resolve_adapter",
    "resolve_rollout_version",
    "resolve_stack",
    "restore_stable",
    "resume_rollout",
    "retire_version",
    "revoke_api_key",
    "rollback",
    "rollout_generation",
    "rollout_stamps",
    "rollout_status",
    "set_rollback_path",
    "set_thresholds",
    "share_adapter",
    "stack_card",
    "stacking_problems",
    "start_rollout",
    "start_shadow",
    "stop_shadow",
    "unshare_adapter",
    "update_tenant_policy",
    "verdict_of",
    "version_address",
    "versions_derived_from",
    "versions_trained_on",
]
