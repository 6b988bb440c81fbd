"""A real S3 protocol server for the registry tests: moto in server mode on a free local port,
reached over HTTP by a real boto3 client. Tests that need it skip, with the reason shown, when
moto (the dev extra) or boto3 (the s3 extra) is not installed."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from registry.store.s3 import make_s3_client

CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
REGION = "us-east-1"


@contextmanager
def moto_server() -> Iterator[str]:
    """Yields the endpoint URL of a fresh moto S3 server; stops it afterwards."""
    pytest.importorskip("boto3", reason="boto3 (loraplex[s3]) is not installed")
    server_module = pytest.importorskip(
        "moto.server", reason="moto[server] (dev extra) is not installed"
    )
    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)  # one line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug_log.setLevel(level)


def s3_client(endpoint: str) -> Any:
    return make_s3_client(endpoint_url=endpoint, region=REGION, **CREDENTIALS)


def new_bucket(client: Any) -> str:
    """A bucket of its own for each test: the server's state outlives a test."""
    name = f"loraplex-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name
