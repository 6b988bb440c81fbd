"""A scripted EngineClient for fast unit tests of gateway logic (never the only test of a
user-visible behaviour: tests/e2e drives the same paths through the real vLLM engine)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.engine.client import (
    AdapterHandle,
    ChoiceDelta,
    EngineHealth,
    GenerationUpdate,
    SamplingOptions,
    TokenLogprob,
)
from gateway.settings import Settings

BASE = "loraplex-demo-base"
ADMIN_TOKEN = "fake-engine-admin"


def scripted_prompt_logprobs(ids: list[int], top_k: int) -> list[TokenLogprob | None]:
    """What the scripted engine says of a prompt's tokens: nothing of the first (as vLLM), then
    token i is `<id>` with logprob -i/10 and the alternatives `alt0`, `alt1`... at -1, -2..."""
    return [None] + [
        TokenLogprob(f"<{token}>", -i / 10, _alternatives(top_k))
        for i, token in enumerate(ids[1:], start=1)
    ]


def _alternatives(top_k: int) -> tuple[tuple[str, float], ...]:
    return tuple((f"alt{k}", -1.0 - k) for k in range(top_k))


class ScriptedEngine:
    max_model_len = 256
    lora_dtype: str | None = None  # a test sets it to play an engine of that dtype
    cached_prompt_tokens: int | None = None  # reported on every update when set
    finish_reason = "length"  # how every choice ends ("error": as vLLM ends a failed request)
    stop_reason: str | int | None = None  # what ended it, with finish_reason "stop"
    # True plays loraplex's engine core (kernels.engine_core_loads): requests go with their
    # adapter's load in flight (a subclass then ends refused ones with finish_reason "error").
    loads_adapters_on_arrival = False
    # True: each token asked for logprobs has them, logprob -0.5, alternatives as a prompt's.
    scripted_logprobs = False

    def __init__(
        self,
        words: list[str],
        fail_after: int | None = None,
        error: Exception | None = None,
        *,
        delay: float = 0.0,
        first_delay: float | None = None,
    ):
        self.words = words
        self.fail_after = fail_after
        self.error = error
        # Seconds each token takes (the first `first_delay`: a queued request, a long prefill).
        self.delay = delay
        self.first_delay = delay if first_delay is None else first_delay
        self.tokens_produced = 0
        self.aborted: list[str] = []
        self.calls: list[tuple[str, AdapterHandle | None, SamplingOptions]] = []
        self.prompts: list[list[int]] = []  # each call's prompt token ids
        # Other words for some adapter versions (by engine id): token i is i where the word
        # equals words[i], else 1000 + i, so outputs share exactly their common prefix.
        self.words_for: dict[int, list[str]] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def default_sampling(self) -> dict[str, Any]:
        return {}

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
    ) -> AsyncIterator[GenerationUpdate]:
        self.calls.append((request_id, adapter, options))
        self.prompts.append(list(prompt_token_ids))
        words = self.words_for.get(adapter.engine_id, self.words) if adapter else self.words
        count = min(options.max_tokens, len(words))
        for i in range(count):
            if self.fail_after is not None and i == self.fail_after:
                assert self.error is not None
                raise self.error
            last = i == count - 1
            pause = self.first_delay if i == 0 else self.delay
            if pause:
                await asyncio.sleep(pause)
            self.tokens_produced += 1
            update = GenerationUpdate(
                prompt_tokens=len(prompt_token_ids),
                choices=[
                    ChoiceDelta(
                        index=c,
                        text=words[i],
                        token_ids=[
                            i if i < len(self.words) and words[i] == self.words[i] else 1000 + i
                        ],
                        logprobs=(
                            [TokenLogprob(words[i], -0.5, _alternatives(options.logprobs))]
                            if self.scripted_logprobs and options.logprobs is not None
                            else None
                        ),
                        finish_reason=self.finish_reason if last else None,
                        stop_reason=self.stop_reason if last else None,
                    )
                    for c in range(options.n)
                ],
                finished=last,
                cached_prompt_tokens=self.cached_prompt_tokens,
            )
            if i == 0 and options.echo_logprobs is not None:
                update.prompt_logprobs = scripted_prompt_logprobs(
                    prompt_token_ids, options.echo_logprobs
                )
            yield update

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        pass

    def start_adapter_load(self, adapter: AdapterHandle) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.add_adapter(adapter))

    def start_adapter_removal(self, engine_id: int) -> asyncio.Future[None]:
        return asyncio.ensure_future(self.remove_adapter(engine_id))

    async def remove_adapter(self, engine_id: int) -> None:
        pass

    async def adapter_pool(self) -> dict[str, Any] | None:
        return None  # vLLM's own slot buffers: no paged pool

    async def residency_waits(self) -> list[float]:
        return []

    async def health(self) -> EngineHealth:
        return EngineHealth(alive=True, detail={"unfinished_requests": 0})


class KeyedClient(TestClient):
    """Once started, holds a fresh tenant key and sends it on every request."""

    def __enter__(self) -> KeyedClient:
        super().__enter__()
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self.tenant = tenant = f"t{uuid.uuid4().hex[:8]}"
        assert self.post("/admin/v1/tenants", json={"name": tenant}, headers=admin).is_success
        issued = self.post(f"/admin/v1/tenants/{tenant}/keys", headers=admin)
        self.headers["Authorization"] = f"Bearer {issued.json()['key']}"
        return self


def client_for(demo_root: Path, engine: Any, **overrides: Any) -> KeyedClient:
    defaults: dict[str, Any] = {
        "base_model": demo_root / "base",
        "served_model_name": BASE,
        "adapter_dir": None,
        "data_dir": demo_root / "data",
        "admin_token": ADMIN_TOKEN,
        "drift_sample_rate": 0,  # sampled at random otherwise (tests/gateway/test_prompt_drift)
    }
    settings = Settings(**{**defaults, **overrides})
    return KeyedClient(create_app(settings, engine=engine), raise_server_exceptions=False)


@dataclass
class AsgiResult:
    status: int | None
    body: bytes


async def asgi_post(
    app: Any,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    *,
    hang_up_after_s: float | None = None,
    hang_up_after_chunks: int | None = None,
    stall_send_s: float = 0.0,
) -> AsgiResult:
    """POST to the app as uvicorn drives it (ASGI spec 2.3), with a client that can hang up,
    which TestClient cannot: after `hang_up_after_s` seconds, or on receiving its
    `hang_up_after_chunks`-th body chunk (0: the response's start). With `stall_send_s`, the
    send that delivers it then blocks that long, as uvicorn's does while a gone peer's socket
    buffer is full."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 80),
    }
    gone = asyncio.Event()
    request_sent = False
    chunks = 0
    result = AsgiResult(None, b"")

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunks
        if message["type"] == "http.response.start":
            result.status = message["status"]
            if hang_up_after_chunks == 0:
                gone.set()
                await asyncio.sleep(stall_send_s)
        elif message["type"] == "http.response.body" and message.get("body"):
            if gone.is_set():
                return
            result.body += message["body"]
            chunks += 1
            if chunks == hang_up_after_chunks:
                gone.set()
                await asyncio.sleep(stall_send_s)

    async def hang_up_later() -> None:
        if hang_up_after_s is not None:
            await asyncio.sleep(hang_up_after_s)
            gone.set()

    timer = asyncio.ensure_future(hang_up_later())
    try:
        await app(scope, receive, send)
    finally:
        timer.cancel()
    return result


def built_demo_root(tmp_path_factory: Any, name: str) -> Path:
    """A folder holding the demo base under `base/` (module-scoped fixtures build one each)."""
    from gateway.demo import build_base

    root = Path(tmp_path_factory.mktemp(name))
    build_base(root / "base")
    return root


@contextlib.contextmanager
def openai_context(
    demo_root: Path, engine: Any, **overrides: Any
) -> Iterator[tuple[KeyedClient, Any, Any]]:
    """The app over `engine` (settings `overrides`), its keyed test client, and the official
    openai client on it."""
    import openai

    with client_for(demo_root, engine, **overrides) as client:
        key = client.headers["Authorization"].removeprefix("Bearer ")
        sdk = openai.OpenAI(
            api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0
        )
        yield client, sdk, engine
