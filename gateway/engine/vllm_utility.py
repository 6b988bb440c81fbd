"""Engine-core utility calls that AsyncLLM's own methods cannot make (vLLM 0.32).

AsyncLLM.add_lora and call_utility_async send their message only when their task first runs:
a request sent meanwhile overtakes it on the engine core's input socket. `send_utility` sends
(or queues, in order) before it returns, with the message AsyncMPClient.call_utility_async
builds, so the engine core handles it before anything sent after."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from gateway.engine.client import EngineDead

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)


def send_utility(
    engine: AsyncLLM, method: str, *args: Any
) -> tuple[Awaitable[Any], asyncio.Future[Any]]:
    """(the send, the answer). The send raises if the socket failed; EngineDead at once when
    the engine core is known dead."""
    from vllm.v1.engine import EngineCoreRequestType
    from vllm.v1.engine.exceptions import EngineDeadError

    client: Any = engine.engine_core
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    call_id = uuid.uuid1().int >> 64
    message = (
        EngineCoreRequestType.UTILITY.value,
        *client.encoder.encode((client.client_index, call_id, method, args)),
    )
    client.utility_results[call_id] = answer
    try:
        sent = client._send_input_message(message, client.core_engine)
    except EngineDeadError as exc:
        client.utility_results.pop(call_id, None)
        raise EngineDead(f"the inference engine is not running: {exc}") from exc
    client._ensure_output_queue_task()
    return sent, answer


async def engine_core_has(engine: AsyncLLM, utility: str, timeout_s: float) -> bool:
    """Whether the engine core answers `utility` (one loraplex's plugin adds) with True."""
    try:
        async with asyncio.timeout(timeout_s):
            has = bool(await engine.engine_core.call_utility_async(utility))
    except Exception as exc:
        logger.warning("the engine core has no %s: %s", utility, exc)
        return False
    logger.info("the engine core has %s: %s", utility, has)
    return has


async def raised(exc: Exception) -> None:
    """An awaitable that raises `exc`: the answer to a call that could not be sent."""
    raise exc
