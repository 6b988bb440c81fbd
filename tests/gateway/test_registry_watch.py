"""Two gateway replicas on one registry: a change made through one reaches the other's caches
of names and keys within a poll of the registry's change generation, not after the caches'
TTL (30 s here, as by default), and without changes the other replica keeps serving from its
caches with no database round trip."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.registry_watch import RegistryWatch
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, complete, register, wait_for

POLL_S = 0.05


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("watch"))


def test_a_change_through_one_replica_reaches_the_others_caches_within_a_poll(demo_root):
    settings = {"catalog_cache_ttl_s": 30.0, "rollout_poll_interval_s": POLL_S}
    with (
        client_for(demo_root, ScriptedEngine(["a"]), **settings) as a,
        client_for(demo_root, ScriptedEngine(["b"]), **settings) as b,
    ):
        register(a, demo_root, "watched", "v1")
        b.headers["Authorization"] = a.headers["Authorization"]  # the same tenant on b
        assert complete(b, "watched") == 200  # b resolved and cached the name and the key
        time.sleep(5 * POLL_S)
        assert complete(b, "watched") == 200  # nothing changed: still served from the cache

        retired = a.post("/admin/v1/adapters/watched/versions/1/retire", headers=ADMIN)
        assert retired.status_code == 200, retired.text
        # b never saw the retirement itself; its cache would hold the name for 30 s
        assert wait_for(lambda: complete(b, "watched") == 404, timeout_s=2.0)

        keys = a.get("/admin/v1/keys", params={"tenant": a.tenant}, headers=ADMIN).json()
        revoked = a.post(f"/admin/v1/keys/{keys[0]['key_id']}/revoke", headers=ADMIN)
        assert revoked.status_code == 200, revoked.text
        assert wait_for(lambda: complete(b, "base") == 401, timeout_s=2.0)


class _Sessions:
    """A registry whose database fails on demand: the watch's own failure handling."""

    def __init__(self, runtime, fail: list[bool]):
        self._runtime, self._fail = runtime, fail

    def __call__(self):
        if self._fail[0]:
            raise ConnectionError("registry unreachable")
        return self._runtime.sessions()


async def test_after_a_failed_poll_the_caches_are_dropped_once_the_registry_answers(demo_root):
    from gateway.registry_runtime import open_registry
    from gateway.settings import Settings

    settings = Settings(base_model=demo_root / "base", data_dir=demo_root / "data-watch")
    runtime = await open_registry(settings, demo_root / "base", "watch-base")
    dropped: list[int] = []
    fail = [False]

    class Runtime:
        sessions = _Sessions(runtime, fail)

    watch = RegistryWatch(Runtime(), [lambda: dropped.append(1)], poll_interval_s=POLL_S)
    try:
        assert await watch.check() is False  # the first check records the generation
        assert await watch.check() is False and dropped == []
        fail[0] = True
        with pytest.raises(ConnectionError):
            await watch.check()
        assert dropped == []  # the caches keep serving while the registry is unreachable
        fail[0] = False
        assert await watch.check() is True and dropped == [1]  # a change may have been missed
        assert await watch.check() is False and dropped == [1]
    finally:
        await runtime.close()


async def test_a_key_verified_across_an_invalidation_is_not_cached(demo_root, monkeypatch):
    """The lookup awaits the registry: a revocation seen meanwhile must not be outlived by a
    cache entry written after it."""
    from gateway.auth import KeyAuthenticator
    from gateway.registry_runtime import open_registry
    from gateway.settings import Settings
    from registry import service

    settings = Settings(base_model=demo_root / "base", data_dir=demo_root / "data-keys")
    runtime = await open_registry(settings, demo_root / "base", "keys-base")
    try:
        async with runtime.sessions() as session:
            await service.create_tenant(session, name="keyed", actor="root")
            issued = await service.create_api_key(session, tenant="keyed", actor="root")
        authenticator = KeyAuthenticator(runtime, cache_ttl_s=30)
        original, started, release = service.authenticate_api_key, asyncio.Event(), asyncio.Event()
        lookups = []

        async def slow(*args, **kwargs):
            lookups.append(1)
            started.set()
            await release.wait()
            return await original(*args, **kwargs)

        monkeypatch.setattr(service, "authenticate_api_key", slow)
        first = asyncio.create_task(authenticator.authenticate(issued.plaintext, client=None))
        await started.wait()
        authenticator.invalidate()
        release.set()
        assert (await first).tenant == "keyed"
        await authenticator.authenticate(issued.plaintext, client=None)
        assert len(lookups) == 2  # asked again: the first answer was not kept
        await authenticator.authenticate(issued.plaintext, client=None)
        assert len(lookups) == 2  # and then cached as usual
    finally:
        await runtime.close()


async def test_a_failing_callback_is_retried_alone_and_the_others_still_run(demo_root):
    from gateway.registry_runtime import open_registry
    from gateway.settings import Settings
    from registry import service

    settings = Settings(base_model=demo_root / "base", data_dir=demo_root / "data-watch-fail")
    runtime = await open_registry(settings, demo_root / "base", "watch-fail-base")
    calls: list[str] = []
    broken = [True]

    def failing() -> None:
        calls.append("failing")
        if broken[0]:
            raise OSError("local copy not removable")

    async def dropping() -> None:
        calls.append("dropping")

    watch = RegistryWatch(runtime, [failing, dropping], poll_interval_s=POLL_S)
    try:
        await watch.check()
        async with runtime.sessions() as session:
            await service.create_tenant(session, name="watch-fail", actor="ops")
        with pytest.raises(RuntimeError):
            await watch.check()
        assert calls == ["failing", "dropping"]  # the failure did not stop the next one
        with pytest.raises(RuntimeError):
            await watch.check()  # no change: only the failed one again
        assert calls == ["failing", "dropping", "failing"]
        broken[0] = False
        assert await watch.check() is False
        assert await watch.check() is False
        assert calls == ["failing", "dropping", "failing", "failing"]
    finally:
        await runtime.close()
