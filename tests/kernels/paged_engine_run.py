"""One offline vLLM engine serving a batch of LoRA / base requests; results as JSON.

Run as `python -m tests.kernels.paged_engine_run SPEC.json OUT.json` by test_paged_engine, in
its own process so the plugin's environment (LORAPLEX_PAGED_*) and the patches it installs
reach every vLLM process and never leak into the test session. SPEC holds the base model path,
engine settings and jobs (adapter name or null, prompt token ids); OUT gets, per job, the
generated token ids or the error, plus the paged pool's counters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    engine = spec["engine"]
    llm = LLM(
        model=spec["base"],
        enable_lora=True,
        max_loras=engine["max_loras"],
        max_lora_rank=engine["max_lora_rank"],
        max_cpu_loras=engine["max_cpu_loras"],
        max_num_seqs=engine.get("max_num_seqs", 16),
        max_model_len=512,
        dtype="float32",
        enforce_eager=True,
        # On CPU this is the share of host memory vLLM reserves (KV cache); the tiny model
        # needs little, and the default (0.92) fails on a shared machine.
        gpu_memory_utilization=0.1,
        seed=0,
    )
    ids = {name: i + 1 for i, name in enumerate(spec["adapters"])}
    requests = {name: LoRARequest(name, ids[name], path) for name, path in spec["adapters"].items()}
    prompt_logprobs = 0 if spec.get("prompt_logprobs") else None
    params = SamplingParams(
        temperature=0, max_tokens=spec["max_tokens"], prompt_logprobs=prompt_logprobs
    )
    out: dict[str, Any] = {"outputs": None, "error": None}
    try:
        for name in spec.get("prefetch", []):  # what the gateway's add_adapter does
            llm.llm_engine.add_lora(requests[name])
        if spec.get("prefetch"):
            out["stats_after_prefetch"] = llm.collective_rpc("loraplex_paged_pool_stats")[0]
        results = llm.generate(
            [{"prompt_token_ids": job["prompt_ids"]} for job in spec["jobs"]],
            params,
            lora_request=[requests.get(job["adapter"]) for job in spec["jobs"]],
            use_tqdm=False,
        )
        out["outputs"] = [list(r.outputs[0].token_ids) for r in results]
        out["finish_reasons"] = [r.outputs[0].finish_reason for r in results]
        if prompt_logprobs is not None:  # as the gateway reads them (gateway/prompt_drift.py)
            from gateway.engine.vllm_convert import _surprisal

            out["prompt_surprisal"] = [_surprisal(r) for r in results]
        if not spec.get("paged", True):
            return out
        out["stats"] = llm.collective_rpc("loraplex_paged_pool_stats")[0]
        out["pool_groups"] = llm.collective_rpc("loraplex_paged_pool_groups")[0]
        out["paged_layers"] = llm.collective_rpc("loraplex_paged_layers")[0]
        out["paged_kernels"] = llm.collective_rpc("loraplex_paged_kernels")[0]
        out["residency_waits"] = residency_waits(llm)
    except Exception as exc:  # reported to the test, which decides whether it was expected
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["cause"] = repr(exc.__cause__) if exc.__cause__ else None
    return out


def residency_waits(llm: Any) -> list[float]:
    """The scheduler's residency waits (an engine-core utility method the plugin adds), the
    way the gateway reads them; the engine core runs in its own process or in this one."""
    core = llm.llm_engine.engine_core
    if hasattr(core, "call_utility"):
        return list(core.call_utility("loraplex_residency_waits"))
    return list(core.engine_core.loraplex_residency_waits())


if __name__ == "__main__":
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    result = run(json.loads(spec_path.read_text()))
    out_path.write_text(json.dumps(result))
