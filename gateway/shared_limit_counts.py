"""What one replica runs per tenant, as gateway.shared_limits writes it to the limits store.

The replica counts its sequences per tenant exactly (`counts`) and writes each tenant's whole
count with a version it increases on every change; the store keeps the newest
(gateway/shared_limit_scripts.py REPORT), so writes that arrive late, out of order or twice
cannot leave a wrong count. Writes go out after releases (one flush at a time, every count
changed meanwhile in one pipeline) and at every renewal; tokens a release owes the tenant's
shared bucket go with them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable

import redis.asyncio as redis
from redis.exceptions import NoScriptError

from gateway.metrics import LIMIT_STORE_ERRORS
from gateway.shared_limit_scripts import REPORT

logger = logging.getLogger(__name__)

# Store errors: what redis-py raises when the store cannot be reached or does not answer.
STORE_ERRORS = (redis.RedisError, OSError, asyncio.TimeoutError)


class ReplicaCounts:
    def __init__(
        self,
        writer: redis.Redis,
        keys: Callable[..., list[str]],
        *,
        replica: str,
        alive_ms: int,
        keep_ms: int,
        timeout_s: float,
        may_write: Callable[[], bool],
        on_failure: Callable[[str, BaseException], None],
    ):
        """`writer`: connections of its own (a burst of admissions must not keep the writes
        from one); `keys(tenant, *parts)`: the tenant's keys; `may_write`: whether the store
        counts as up; `on_failure(operation, error)`: a write that failed."""
        self._writer, self._keys = writer, keys
        self._report = writer.register_script(REPORT)
        self._replica, self._alive_ms, self._keep_ms = replica, alive_ms, keep_ms
        self._timeout_s = timeout_s
        self._may_write, self._on_failure = may_write, on_failure
        self.counts: Counter[str] = Counter()  # tenant -> sequences this replica runs
        self.version = 0  # increased on every change of counts: the store keeps the newest
        self.dirty: set[str] = set()  # tenants whose newest count the store may lack
        self.refunds: Counter[str] = Counter()  # tenant -> tokens owed to its shared bucket
        self.flushing: asyncio.Task[None] | None = None  # writes changed counts

    def flush_soon(self) -> None:
        """Write the dirty counts now, in a task: a request's last step must not wait on the
        store, and one flush at a time writes every count changed meanwhile in one pipeline."""
        if not self._may_write() or self.flushing is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to write from: the next renewal does
            return
        self.flushing = loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self.dirty and self._may_write():
                error, complete = await self.write(set(self.dirty))
                if error is not None:
                    self._on_failure("release", error)
                if not complete:
                    return  # the renewal retries what was not written
        finally:
            self.flushing = None

    async def renew(self) -> None:
        """Write this replica's count and deadline for every tenant it runs sequences of, and
        for those whose newest count or owed tokens may not have reached the store; with
        nothing to write, ask the store whether it answers (an idle replica's up gauge)."""
        tenants = set(self.counts) | self.dirty
        if not tenants:
            await self._writer.ping()
            return
        error, _ = await self.write(tenants)
        if error is not None:
            raise error

    async def write(self, tenants: Iterable[str]) -> tuple[BaseException | None, bool]:
        """Each tenant's count as it is now, with the version it is now, and the tokens owed
        to it, in one pipeline. A tenant whose write the store refused stays dirty and owed (a
        refusal applied nothing: the refund is the script's last step); when the connection
        failed, the counts stay dirty but the tokens are not owed again, since the store may
        have applied them (a refund is given at most once). Returns the error if nothing was
        written, and whether everything was."""
        snapshot = [
            (tenant, self.counts.get(tenant, 0), self.refunds.pop(tenant, 0))
            for tenant in list(tenants)
        ]
        if not snapshot:
            return None, True
        version = self.version
        self.dirty.difference_update(tenant for tenant, _, _ in snapshot)
        try:
            replies = await self._send_reports(snapshot, version)
        except BaseException as exc:
            self.dirty.update(tenant for tenant, _, _ in snapshot)
            if not isinstance(exc, STORE_ERRORS):
                raise
            return exc, False
        refused = [
            (entry, reply)
            for entry, reply in zip(snapshot, replies, strict=True)
            if isinstance(reply, Exception)
        ]
        for (tenant, _, refund), _reply in refused:
            self.dirty.add(tenant)
            if refund:
                self.refunds[tenant] += refund
        if refused:
            LIMIT_STORE_ERRORS.labels("report").inc(len(refused))
            logger.warning(
                "the limits store refused %d of %d count writes (%s)",
                len(refused),
                len(snapshot),
                refused[0][1].__class__.__name__,
            )
            if len(refused) == len(snapshot):
                error = refused[0][1]
                return (error if isinstance(error, BaseException) else None), False
        return None, not refused

    async def _send_reports(
        self, snapshot: list[tuple[str, int, int]], version: int, *, reload: bool = True
    ) -> list[object]:
        """The store's reply to each tenant's REPORT, an exception object where it refused."""
        # EVALSHA straight into the pipeline: redis-py's script objects would ask the store
        # whether the script exists before every pipeline, a round trip each time.
        pipe = self._writer.pipeline(transaction=False)
        for tenant, count, refund in snapshot:
            keys = self._keys(tenant, "run", "alive", "tokens")
            args = (self._replica, self._alive_ms, self._keep_ms, count, version, refund)
            pipe.evalsha(self._report.sha, len(keys), *keys, *args)
        async with asyncio.timeout(self._timeout_s):
            replies: list[object] = await pipe.execute(raise_on_error=False)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing and reload:  # the store restarted empty: load the script, send those again
            await self._writer.script_load(REPORT)
            again = await self._send_reports([snapshot[i] for i in missing], version, reload=False)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def change(self, tenant: str, sequences: int) -> None:
        self.counts[tenant] += sequences
        if self.counts[tenant] <= 0:
            del self.counts[tenant]
        self.version += 1
