"""loraplex adapter registry: the truth about base models, tenants, adapters and their versions.

Knows nothing about HTTP or engines (never imports gateway or kernels). Entry points:

- `registry.db`        make_engine / make_session_factory / migrate (alembic, shipped inside)
- `registry.service`   keyword-only async functions the gateway calls (register, resolve, ...)
- `registry.compat`    the compatibility gate: inspect_adapter, fingerprint_base_model, run_gate
- `registry.ingest`    bounded upload streaming, safe archive extraction, allow-listed paths
- `registry.store`     content-addressed artifact stores (local, S3-compatible)
- `registry.card`      the Adaptation Card schema
- `registry.rollout`   canary stages, sticky assignment, RolloutView routing, rollback thresholds
- `registry.naming`    name rules and how versions are addressed (`name`, `name@3`)
- `registry.errors`    typed exceptions, one per refusal kind
"""
