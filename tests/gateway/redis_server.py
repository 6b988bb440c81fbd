"""Redis for the shared-limits tests: the machine's server (LORAPLEX_TEST_REDIS_URL, default
127.0.0.1:6379) and a private `redis-server` a test can stop and start again (an outage)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BUSY_SCRIPT = """
local started = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - started[1]) * 1000000 + (now[2] - started[2]) > tonumber(ARGV[1]) then
    return 0
  end
end
"""


def shared_redis_url() -> str:
    """The machine's Redis; the test is skipped when none answers."""
    url = os.environ.get("LORAPLEX_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"no Redis at {url}: {exc}")
    return url


def unique_prefix() -> str:
    return f"loraplex-test-{uuid.uuid4().hex[:12]}"


def clear_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own, on its own port, keeping nothing on disk."""

    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self._binary, self._workdir = binary, workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                *(self._binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self._workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except (redis.RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """Kill it: everything it held is gone, as when a Redis without persistence dies."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def start_busy(self, seconds: float) -> threading.Thread:
        """Keep the server busy for `seconds` (a script spinning on its clock; commands wait
        meanwhile) from a thread; returns once the server is seen busy."""
        spinner = threading.Thread(
            target=lambda: self.client().eval(BUSY_SCRIPT, 0, round(seconds * 1e6))
        )
        spinner.start()
        probe = redis.Redis(port=self.port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except (redis.TimeoutError, redis.ConnectionError):
                return spinner  # the ping waits behind the script
            time.sleep(0.005)
        raise AssertionError("the server never got busy")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@contextmanager
def private_redis(workdir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
