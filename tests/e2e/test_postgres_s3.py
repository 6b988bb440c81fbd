"""The production shape end to end: a gateway whose registry is the real PostgreSQL and whose
artifact store is S3 (moto's S3 server), registering an adapter by s3:// URI and serving its
first token without a restart, byte-identical to the same adapter uploaded to the SQLite
session gateway. Skips with the reason shown when PostgreSQL does not answer or moto/boto3 are
missing."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import cli, start_gateway, stop_gateway, tenant_with_key
from tests.registry.s3_server import CREDENTIALS, REGION, moto_server, new_bucket, s3_client

pytestmark = [pytest.mark.engine, pytest.mark.postgres]
ADAPTER_SOURCE = "demo-qv-rs32"  # rsLoRA: scale must survive the S3 round trip too


def greedy(client: openai.OpenAI, model: str) -> str:
    response = client.completions.create(
        model=model, prompt="The gateway serves", max_tokens=16, temperature=0
    )
    return response.choices[0].text


def test_postgres_registry_s3_store_and_s3_uri_registration(
    gateway, demo, postgres_database, tmp_path
):
    with moto_server() as endpoint:
        s3 = s3_client(endpoint)
        store_bucket, import_bucket = new_bucket(s3), new_bucket(s3)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            s3.upload_file(
                str(demo.adapters[ADAPTER_SOURCE] / file), import_bucket, f"team/rs32/{file}"
            )
        own = start_gateway(
            demo,
            tmp_path,
            LORAPLEX_DATABASE_URL=postgres_database,
            LORAPLEX_ARTIFACT_STORE=f"s3://{store_bucket}/artifacts",
            LORAPLEX_S3_ENDPOINT_URL=endpoint,
            LORAPLEX_S3_REGION=REGION,
            LORAPLEX_S3_IMPORT_BUCKETS=f'["{import_bucket}"]',
            AWS_ACCESS_KEY_ID=CREDENTIALS["access_key_id"],
            AWS_SECRET_ACCESS_KEY=CREDENTIALS["secret_access_key"],
        )
        try:
            health = cli(own, "tenants", "list")
            assert health.returncode == 0, health.stderr
            key = tenant_with_key(own, "pg-tenant")
            uri = f"s3://{import_bucket}/team/rs32"
            registered = cli(
                own, "adapters", "register", uri, "--name", "from-s3", "--tenant", "pg-tenant"
            )
            assert registered.returncode == 0, registered.stderr + own.log_tail()
            source = f"s3://{store_bucket}/x"
            refused = cli(own, "adapters", "register", source, "--name", "nope", "--tenant", "t")
            assert refused.returncode == 1  # not an allow-listed import bucket

            stored = s3.list_objects_v2(Bucket=store_bucket, Prefix="artifacts/")
            assert stored.get("KeyCount", 0) > 0  # the artifact lives in S3, not on disk

            client = openai.OpenAI(base_url=own.v1, api_key=key, max_retries=0, timeout=120)
            served = greedy(client, "from-s3")
        finally:
            stop_gateway(own)
    session = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, timeout=120)
    assert served == greedy(session, ADAPTER_SOURCE)
