"""vLLM's engine core loads a request's adapter when the request arrives, and a failed load
refuses that request instead of failing an engine step.

vLLM 0.32 loads an adapter that is not resident inside the step that first schedules a
request for it (the worker's `_apply_adapters`), and an exception there kills the engine for
every tenant. The gateway therefore loaded each adapter with `add_lora` and waited for the
answer before it submitted the request: a failed load became one request's 500, but every
first use of an adapter paid an extra engine-step boundary for the round trip (measured: +8-9
ms TTFT p50 per first use, benchmarks/results/residency runs 29-30).

Installed in the engine-core process (by the plugin, in every process vLLM starts):
- `add_request` with an adapter the engine core has not loaded loads it first, between steps,
  as the utility `add_lora` would; if that fails the request ends at once with finish reason
  "error" (vLLM's own request-scoped refusal), and nothing reaches the scheduler.
- A failed `add_lora` is remembered: requests for that adapter are refused without another
  attempt until the next `add_lora` of it. The gateway sends `add_lora` and then, without
  waiting for the answer, the request (one socket, so the engine core sees them in that order):
  the request's fate is the load's, never a second attempt that might succeed behind the
  gateway's back and leave the engine holding an adapter the gateway's cache does not count.
- `loraplex_loads_on_arrival()`: a utility the gateway calls at start-up to learn that this is
  installed (else it waits for every load, as before).

Which adapters the engine core has loaded is tracked here (what `add_lora` loaded, less what
`remove_lora` removed): asking the workers on every request would be an RPC per request with
several workers. vLLM evicts by itself only when its `max_cpu_loras` is full, which the
gateway's cache prevents; an adapter evicted that way anyway is loaded in the step, as
vLLM does without this.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)

STATUS_UTILITY = "loraplex_loads_on_arrival"
_INSTALLED = "_loraplex_loads_on_arrival"
_STATE = "_loraplex_adapter_state"


def _state(core: Any) -> tuple[set[int], set[int]]:
    """(loaded, refused) adapter ids of this engine core."""
    state = core.__dict__.get(_STATE)
    if state is None:
        state = core.__dict__[_STATE] = (set(), set())
    return state


def _refuse(core: Any, request: Any, lora_id: int) -> None:
    send_error = getattr(core, "_send_error_outputs_to_client", None)
    if send_error is None:  # an in-process engine core: the caller gets the exception
        raise ValueError(f"adapter {lora_id} could not be loaded")
    send_error([request.request_id], request.client_index)


def install() -> list[str]:
    """Patch vLLM's EngineCore (idempotent); the names of what was patched."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, _INSTALLED, False):
        return []
    add_request = EngineCore.add_request
    add_lora = EngineCore.add_lora
    remove_lora = EngineCore.remove_lora

    # functools.wraps keeps vLLM's signatures: the utility call converts its msgspec arguments
    # (a LoRARequest arrives as a list) by the annotations inspect.signature finds through it.
    @functools.wraps(add_lora)
    def add_lora_tracked(self: Any, lora_request: Any) -> bool:
        loaded, refused = _state(self)
        lora_id = lora_request.lora_int_id
        refused.discard(lora_id)  # a new attempt: its outcome decides from now on
        try:
            ok = add_lora(self, lora_request)
        except BaseException:
            loaded.discard(lora_id)
            refused.add(lora_id)
            raise
        if ok:
            loaded.add(lora_id)
        else:
            refused.add(lora_id)
        return ok

    @functools.wraps(remove_lora)
    def remove_lora_tracked(self: Any, lora_id: int) -> bool:
        loaded, refused = _state(self)
        loaded.discard(lora_id)
        refused.discard(lora_id)
        return remove_lora(self, lora_id)

    @functools.wraps(add_request)
    def add_request_loading(self: Any, request: Any, request_wave: int = 0) -> None:
        lora = request.lora_request
        if lora is not None:
            loaded, refused = _state(self)
            lora_id = lora.lora_int_id
            if lora_id in refused:
                _refuse(self, request, lora_id)
                return
            if lora_id not in loaded:
                try:
                    ok = add_lora_tracked(self, lora)
                except Exception:
                    logger.exception(
                        "loraplex: loading adapter %s for request %s failed: request refused",
                        lora_id,
                        request.request_id,
                    )
                    ok = False
                if not ok:
                    _refuse(self, request, lora_id)
                    return
        add_request(self, request, request_wave)

    def loads_on_arrival(self: Any) -> bool:
        return True

    EngineCore.add_request = add_request_loading  # type: ignore[method-assign]
    EngineCore.add_lora = add_lora_tracked  # type: ignore[method-assign]
    EngineCore.remove_lora = remove_lora_tracked  # type: ignore[method-assign]
    setattr(EngineCore, STATUS_UTILITY, loads_on_arrival)
    setattr(EngineCore, _INSTALLED, True)
    return ["EngineCore.add_request", "EngineCore.add_lora", "EngineCore.remove_lora"]
