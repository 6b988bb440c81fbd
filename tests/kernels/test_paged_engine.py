"""A real vLLM engine with paged LoRA on serves every request its own adapter's output (and,
at the end of the slot-mode section, vLLM's own slots with the plugin's slot-mode changes).

Each engine runs in its own process (tests/kernels/paged_engine_run.py) with LORAPLEX_PAGED_*
set, so the plugin pages the weights in every vLLM process and nothing leaks into this session.
Ground truth is HF transformers with the adapter merged (tests/e2e/merged_reference.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed")

from gateway.demo import (
    ALL_PROJECTIONS,
    DemoAdapterSpec,
    DemoPaths,
    build_adapter,
)
from kernels.page_groups import DemandEntry, format_demand
from tests.e2e.merged_reference import greedy_tokens
from tests.paged_budget import PAGE_SIZE, pages, row_bytes

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["The gateway serves", "Hello world, what is the rank of"]
MAX_TOKENS = 16
# Extra adapters at both ends of the rank range, all seven projections.
EXTRA = (
    DemoAdapterSpec("paged-r1", rank=1, alpha=4, target_modules=ALL_PROJECTIONS, seed=31),
    DemoAdapterSpec("paged-r64", rank=64, alpha=32, target_modules=ALL_PROJECTIONS, seed=32),
)


ROW_BYTES = row_bytes()
# The demo Llama's layer groups (kernels.page_groups): one page ledger each. Without a demand
# profile each gets the pool's page count, so page counts summed over groups are 4x it.
GROUPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def adapters(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    extra_dir = tmp_path_factory.mktemp("paged-adapters")
    for spec in EXTRA:
        build_adapter(demo.base, extra_dir / spec.name, spec)
    return {**demo.adapters, **{spec.name: extra_dir / spec.name for spec in EXTRA}}


@pytest.fixture(scope="module")
def prompt_ids(demo: DemoPaths) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    return [tokenizer.encode(prompt) for prompt in PROMPTS]


def run_engine(
    tmp_path: Path,
    demo: DemoPaths,
    adapters: dict[str, Path],
    jobs: list[tuple[str | None, list[int]]],
    *,
    max_loras: int,
    pool_bytes: int,
    max_lora_rank: int = 64,
    prefetch: tuple[str, ...] = (),
    paged: bool = True,
    prompt_logprobs: bool = False,
    **extra_env: str,
) -> tuple[dict, str]:
    """`paged` False: vLLM's own slot buffers, with the plugin's slot-mode changes."""
    spec = {
        "base": str(demo.base),
        "adapters": {name: str(path) for name, path in adapters.items()},
        "engine": {
            "max_loras": max_loras,
            "max_lora_rank": max_lora_rank,
            "max_cpu_loras": len(adapters),
        },
        "max_tokens": MAX_TOKENS,
        "prefetch": list(prefetch),
        "paged": paged,
        "prompt_logprobs": prompt_logprobs,
        "jobs": [{"adapter": name, "prompt_ids": ids} for name, ids in jobs],
    }
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")},
        **(
            {
                "LORAPLEX_PAGED_LORA": "1",
                "LORAPLEX_PAGED_POOL_BYTES": str(pool_bytes),
                "LORAPLEX_PAGED_PAGE_SIZE": str(PAGE_SIZE),
            }
            if paged
            else {}
        ),
        **extra_env,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.paged_engine_run", str(spec_path), str(out_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and out_path.exists(), log[-4000:]
    return json.loads(out_path.read_text()), log


@pytest.mark.parametrize("kernel", ["auto", "triton"])
def test_mixed_ranks_and_base_with_every_slot_full_match_merged_references(
    tmp_path, demo, adapters, prompt_ids, kernel
):
    """auto is the torch path on CPU; triton runs the SGMV kernels inside the engine, here
    under the Triton interpreter (the CUDA path's code, on CPU)."""
    ranks = {"paged-r64": 64, "demo-qv-rs32": 32, "demo-all-r16": 16, "demo-qkvo-r8": 8}
    ranks |= {"demo-mlp-r4": 4, "paged-r1": 1}
    # The pool holds the three largest adapters at once (any batch of max_loras=3 fits) but
    # not all six: later batches page out earlier adapters. vLLM would need 3 x 64 rows.
    pool_pages = sum(sorted((pages(r) for r in ranks.values()), reverse=True)[:3])
    assert pool_pages < sum(pages(r) for r in ranks.values())
    order = [*ranks, None]  # largest first, so the first batch fills the pool exactly
    jobs = [(name, ids) for ids in prompt_ids for name in order]
    out, log = run_engine(
        tmp_path,
        demo,
        adapters,
        jobs,
        max_loras=3,
        pool_bytes=pool_pages * PAGE_SIZE * ROW_BYTES,
        LORAPLEX_PAGED_KERNEL=kernel,
        TRITON_INTERPRET="1",
    )
    assert out["error"] is None, (out["error"], log[-4000:])

    layers = out["paged_layers"]
    want_kernel = "torch" if kernel == "auto" else kernel
    assert set(out["paged_kernels"].values()) == {want_kernel}, out["paged_kernels"]
    assert out["paged_kernels"].keys() == layers.keys()
    for proj in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert f"model.layers.0.{proj}" in layers and f"model.layers.1.{proj}" in layers, layers

    check_outputs(demo, adapters, jobs, out["outputs"])

    stats = out["stats"]
    assert stats["bytes_per_page"] == PAGE_SIZE * ROW_BYTES
    assert stats["bytes_total"] == pool_pages * PAGE_SIZE * ROW_BYTES  # exactly the budget
    groups = {g["name"]: g["pages"] for g in out["pool_groups"]["groups"]}
    assert groups == dict.fromkeys(GROUPS, pool_pages) and stats["pages_total"] == 4 * pool_pages
    # per group, as the gateway exports it (loraplex_adapter_pool_pages{group,state})
    assert {g: p["total"] for g, p in stats["group_pages"].items()} == groups
    assert sum(p["used"] for p in stats["group_pages"].values()) == stats["pages_used"]
    # embed_tokens and lm_head run as the base layers: no max_loras x vocab buffers, no ops
    assert stats["vocab_layers_unwrapped"] == 2
    assert stats["page_ins_total"] >= len(ranks)  # every adapter was paged in at least once
    # and adapters left the pool for others (under rotate, the default, slots turning over can
    # free pages before space runs out; the churn test asserts evictions for space)
    assert stats["page_outs_total"] >= 1
    assert stats["refusals_total"] == 0
    assert stats["pages_used"] + stats["pages_free"] == 4 * pool_pages
    assert stats["page_ins_total"] - stats["page_outs_total"] == stats["adapters_resident"]


def test_an_adapter_with_embedding_weights_is_refused_not_half_served(
    tmp_path, tmp_path_factory, demo, prompt_ids
):
    """The registry refuses embed_tokens / lm_head deltas; an adapter that reaches the engine
    with them anyway is refused loudly instead of being served without them: its load fails
    when its request arrives (kernels.engine_core_loads), which ends that request with finish
    reason "error" and no output, where it used to fail the whole step."""
    folder = tmp_path_factory.mktemp("embedding-adapter")
    spec = DemoAdapterSpec("emb-r8", 8, 16, ["q_proj", "embed_tokens"], seed=41)
    build_adapter(demo.base, folder / spec.name, spec)
    out, log = run_engine(
        tmp_path,
        demo,
        {spec.name: folder / spec.name},
        [(spec.name, prompt_ids[0])],
        max_loras=1,
        pool_bytes=pages(32) * PAGE_SIZE * ROW_BYTES,
        max_lora_rank=32,
    )
    assert out["error"] is None, out["error"]
    assert out["outputs"] == [[]] and out["finish_reasons"] == ["error"]
    assert "embed_tokens" in log and "linear projections only" in log, log[-4000:]
    assert "request refused" in log


def prompt_surprisal(demo, adapter: Path | None, ids: list[int]) -> float:
    """HF's sum of -log p(token | earlier) over the prompt's tokens after the first."""
    import torch

    from tests.e2e.merged_reference import merged_model

    with torch.no_grad():
        logits = merged_model(demo.base, adapter)(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -sum(float(logprobs[t, ids[t + 1]]) for t in range(len(ids) - 1))


def test_slot_mode_serves_prompt_logprobs_in_a_full_mixed_batch(tmp_path, demo, prompt_ids):
    """vLLM's own slots (no paged pool), every slot full plus the base, every request asking
    for its prompt's logprobs (gateway/prompt_drift.py): vLLM 0.32's lm_head LoRA wrapper
    failed such a step (one adapter index per request, prompt positions for rows); the plugin
    takes the vocab wrappers out in slot mode too (kernels.slot_vocab). Each output is its own
    adapter's and each prompt's logprobs are its adapter's, as HF gives them."""
    names = list(demo.adapters)
    assert len(names) == 4
    jobs = [(name, ids) for ids in prompt_ids for name in [*names, None]]
    out, log = run_engine(
        tmp_path,
        demo,
        demo.adapters,
        jobs,
        max_loras=4,
        pool_bytes=0,
        max_lora_rank=32,
        paged=False,
        prompt_logprobs=True,
    )
    assert out["error"] is None, (out["error"], log[-4000:])
    check_outputs(demo, demo.adapters, jobs, out["outputs"])
    for (name, ids), (total, count) in zip(jobs, out["prompt_surprisal"], strict=True):
        assert count == len(ids) - 1
        want = prompt_surprisal(demo, demo.adapters[name] if name else None, ids)
        assert total == pytest.approx(want, rel=1e-4), name


def test_slot_mode_refuses_an_adapter_with_embedding_weights(
    tmp_path, tmp_path_factory, demo, prompt_ids
):
    """Without the vocab wrappers such an adapter would be served without its embedding
    delta; it is refused when it is added instead (its request ends with "error")."""
    folder = tmp_path_factory.mktemp("slot-embedding-adapter")
    spec = DemoAdapterSpec("slot-emb-r8", 8, 16, ["q_proj", "embed_tokens"], seed=43)
    build_adapter(demo.base, folder / spec.name, spec)
    jobs = [(spec.name, prompt_ids[0]), (None, prompt_ids[1])]
    out, log = run_engine(
        tmp_path,
        demo,
        {spec.name: folder / spec.name},
        jobs,
        max_loras=1,
        pool_bytes=0,
        max_lora_rank=32,
        paged=False,
    )
    assert out["error"] is None, out["error"]
    assert out["finish_reasons"][0] == "error" and out["outputs"][0] == []
    check_outputs(demo, {}, jobs[1:], out["outputs"][1:])
    assert "embed_tokens" in log and "linear projections only" in log, log[-4000:]


def check_outputs(demo, adapters, jobs, outputs) -> None:
    wrong = []
    for (name, ids), got in zip(jobs, outputs, strict=True):
        want = greedy_tokens(demo.base, adapters[name] if name else None, ids, MAX_TOKENS)
        if got != want:
            wrong.append((name, ids, got, want))
    assert not wrong, wrong


def serve_unfit_pair(tmp_path, demo, adapters, prompt_ids, **options: Any):
    """rs32 and r16 in one batch, on a pool that holds either but not both."""
    jobs = [("demo-qv-rs32", prompt_ids[0]), ("demo-all-r16", prompt_ids[1])]
    out, log = run_engine(
        tmp_path,
        demo,
        adapters,
        jobs,
        max_loras=2,
        pool_bytes=(pages(32) + pages(16) - 1) * PAGE_SIZE * ROW_BYTES,
        max_lora_rank=32,  # with admission, the pool must hold one adapter of max_lora_rank
        **options,
    )
    return jobs, out, log


def test_without_admission_a_batch_that_does_not_fit_the_pool_fails_loudly(
    tmp_path, demo, adapters, prompt_ids
):
    """The worker's own safety net, with the scheduler's admission switched off: the engine
    refuses the step rather than serve."""
    _, out, log = serve_unfit_pair(
        tmp_path, demo, adapters, prompt_ids, LORAPLEX_PAGED_ADMISSION="0"
    )
    assert out["outputs"] is None and out["error"] is not None
    assert "PoolExhausted" in log and "LORAPLEX_PAGED_POOL_BYTES" in log, log[-4000:]


def test_admission_serves_a_batch_that_does_not_fit_the_pool_one_adapter_after_the_other(
    tmp_path, demo, adapters, prompt_ids
):
    """The same batch and pool with admission on (the default) under the hold policy: the
    scheduler holds the second adapter's request until the first one's is done, and both
    answers are right."""
    jobs, out, log = serve_unfit_pair(
        tmp_path,
        demo,
        adapters,
        prompt_ids,
        prefetch=("demo-all-r16", "demo-qv-rs32"),
        LORAPLEX_PAGED_POLICY="hold",
    )
    assert out["error"] is None, (out["error"], log[-4000:])
    check_outputs(demo, adapters, jobs, out["outputs"])
    assert out["stats"]["refusals_total"] == 0
    # Prefetch (add_lora ahead of the requests) pages r16 in; rs32 no longer fits the free
    # pages, and a prefetch never evicts: it waits in host memory for its step.
    ahead = out["stats_after_prefetch"]
    assert (ahead["prefetches_total"], ahead["prefetches_skipped_total"]) == (1, 1)
    assert ahead["page_ins_total"] == 1 and ahead["evictions_for_space_total"] == 0
    assert ahead["pages_used"] == len(GROUPS) * pages(16)  # r16 adapts every layer group
    # rs32 arrived first and took its pages; r16's request waited for residency, once.
    waits = out["residency_waits"]
    assert len(waits) == 1 and 0 < waits[0] < 120, waits


def test_rotation_serves_the_unfit_pair_in_turns(tmp_path, demo, adapters, prompt_ids):
    """The same batch and pool with LORAPLEX_PAGED_POLICY=rotate: the two adapters take turns
    in the pool (each step holds one) instead of one waiting for the other's request to
    finish, and both answers are still exactly right."""
    jobs, out, log = serve_unfit_pair(
        tmp_path, demo, adapters, prompt_ids, LORAPLEX_PAGED_POLICY="rotate"
    )
    assert out["error"] is None, (out["error"], log[-4000:])
    check_outputs(demo, adapters, jobs, out["outputs"])
    stats = out["stats"]
    assert stats["refusals_total"] == 0
    # r16 took rs32's pages mid-stream and rs32 came back for its remaining tokens once it had
    # sat out LORAPLEX_PAGED_MAX_SKIP_MS: three page-ins at least, where holding takes two.
    assert stats["page_ins_total"] >= 3, stats
    assert stats["evictions_for_space_total"] >= stats["page_ins_total"] - 1, stats
    # Whether r16 is held for a step depends on whether both requests reach the scheduler
    # before its first step, so residency waits are not asserted here (the hold tests do).
    assert all(0 < w < 5 for w in out["residency_waits"]), out["residency_waits"]


CHURN_RANKS = (4, 8, 16, 32)
CHURN_TARGETS = (ALL_PROJECTIONS, ["q_proj", "v_proj"], ALL_PROJECTIONS[4:], ALL_PROJECTIONS[:4])


@pytest.mark.parametrize(
    ("policy", "split"), [("hold", "equal"), ("rotate", "equal"), ("rotate", "demand")]
)
def test_churn_of_36_mixed_rank_adapters_through_a_small_pool(
    tmp_path, tmp_path_factory, demo, prompt_ids, policy, split
):
    """36 adapters of ranks 4-32 rotate through a pool that holds about a quarter of them, with
    16 cheap slots, so admission must hold adapters back and the pool must page them in and
    out all the time: every answer is still its own adapter's merged reference. With the
    demand split (LORAPLEX_PAGED_DEMAND: the adapters' ranks and modules, as the gateway sends
    them) the layer groups get different page counts from the same bytes."""
    folder = tmp_path_factory.mktemp("churn")
    churn: dict[str, Path] = {}
    for i in range(36):
        rank = CHURN_RANKS[i % 4]
        targets = list(CHURN_TARGETS[(i // 4) % 4])
        spec = DemoAdapterSpec(f"churn-{i:02d}", rank, 2 * rank, targets, seed=100 + i)
        build_adapter(demo.base, folder / spec.name, spec)
        churn[spec.name] = folder / spec.name
    total = sum(pages(CHURN_RANKS[i % 4]) for i in range(36))
    pool_pages = 32  # of the 135 all 36 need; one rank-32 adapter takes 8
    names = list(churn)
    order = [names[(7 * k) % 36] for k in range(36)]  # neighbours in the queue differ in rank
    jobs = [(name, prompt_ids[k % 2]) for k, name in enumerate(order)]
    jobs += [(None, prompt_ids[0]), *[(name, prompt_ids[1]) for name in order[:12]]]
    demand = [
        DemandEntry(CHURN_RANKS[i % 4], tuple(CHURN_TARGETS[(i // 4) % 4])) for i in range(36)
    ]
    out, log = run_engine(
        tmp_path,
        demo,
        churn,
        jobs,
        max_loras=16,
        pool_bytes=pool_pages * PAGE_SIZE * ROW_BYTES,
        max_lora_rank=32,
        LORAPLEX_PAGED_POLICY=policy,
        LORAPLEX_PAGED_DEMAND=format_demand(demand if split == "demand" else []),
    )
    assert out["error"] is None, (out["error"], log[-4000:])
    check_outputs(demo, churn, jobs, out["outputs"])
    stats = out["stats"]
    groups = {g["name"]: g["pages"] for g in out["pool_groups"]["groups"]}
    assert stats["bytes_total"] <= pool_pages * PAGE_SIZE * ROW_BYTES
    if split == "equal":
        assert groups == dict.fromkeys(GROUPS, pool_pages)
    else:  # q/k/v is adapted by 28 of the 36, the others by 20: q/k/v gets more pages
        assert groups["qkv_proj"] > pool_pages > groups["down_proj"] >= pages(32), groups
    assert total > 4 * pool_pages
    assert stats["refusals_total"] == 0
    assert stats["page_ins_total"] >= len(churn)  # each adapter was paged in
    assert stats["evictions_for_space_total"] > 0  # and pushed others out: the pool churned
    assert out["residency_waits"]  # admission held requests back until their pages were free


def serve_together(tmp_path, demo, served, prompt_ids, ranks: list[int]):
    """Every adapter of `served` and the base on each prompt, in one batch: one slot per
    adapter and a pool that holds adapters of `ranks` at once (max_lora_rank 16)."""
    jobs = [(name, ids) for ids in prompt_ids for name in (*served, None)]
    out, log = run_engine(
        tmp_path,
        demo,
        served,
        jobs,
        max_loras=len(served),
        pool_bytes=sum(pages(r) for r in ranks) * PAGE_SIZE * ROW_BYTES,
        max_lora_rank=16,
    )
    assert out["error"] is None, (out["error"], log[-4000:])
    return jobs, out, log


def test_fused_slices_of_unequal_rank_match_merged_references(
    tmp_path, tmp_path_factory, demo, adapters, prompt_ids
):
    """peft's rank_pattern gives k_proj and up_proj lower ranks than their fused neighbours:
    the paged layer pads those slices with zero rank rows to the group's rank (set_lora's
    padding path) and every answer is still the merged reference, beside an adapter whose
    slices all share one rank (the path that hands slices to the pool as they are)."""
    folder = tmp_path_factory.mktemp("rank-pattern")
    spec = DemoAdapterSpec(
        "patterned", 8, 16, ALL_PROJECTIONS, seed=71, rank_pattern=(("k_proj", 4), ("up_proj", 2))
    )
    build_adapter(demo.base, folder / spec.name, spec)
    config = json.loads((folder / spec.name / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"k_proj": 4, "up_proj": 2}
    served = {"patterned": folder / spec.name, "demo-all-r16": adapters["demo-all-r16"]}
    jobs, out, _ = serve_together(tmp_path, demo, served, prompt_ids, [16, 8])
    check_outputs(demo, served, jobs, out["outputs"])


def test_an_adapter_with_inf_weights_leaves_the_others_in_its_batch_exact(
    tmp_path, tmp_path_factory, demo, adapters, prompt_ids
):
    """An adapter whose weights hold inf (the registry refuses those; an fp32 adapter cast to
    an fp16 pool can still overflow) shares steps with two others: their answers are still
    exactly their merged references, though the CPU path's batched pass multiplies every row
    by every present adapter's rank rows, and the worker says which adapter it is."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("diverged")
    spec = DemoAdapterSpec("diverged", 8, 16, ALL_PROJECTIONS, seed=61)
    build_adapter(demo.base, folder / spec.name, spec)
    weights_path = folder / spec.name / "adapter_model.safetensors"
    weights = load_file(weights_path)
    poisoned = [k for k in weights if "layers.0.self_attn.k_proj.lora_B" in k]
    assert len(poisoned) == 1, list(weights)
    weights[poisoned[0]][3, 1] = float("inf")
    save_file(weights, weights_path)
    served = {
        "diverged": folder / spec.name,
        "demo-all-r16": adapters["demo-all-r16"],
        "demo-qkvo-r8": adapters["demo-qkvo-r8"],
    }
    jobs, out, log = serve_together(tmp_path, demo, served, prompt_ids, [16, 8, 8])
    kept = [i for i, (name, _) in enumerate(jobs) if name != "diverged"]
    check_outputs(demo, served, [jobs[i] for i in kept], [out["outputs"][i] for i in kept])
    assert "has inf or NaN weights in 1 layers" in log, log[-4000:]


def test_an_adapter_whose_config_understates_its_modules_is_charged_for_its_weights(
    tmp_path, tmp_path_factory, demo, prompt_ids
):
    """vLLM loads whatever tensors an adapter has; its adapter_config.json may name fewer
    modules. One that claims o_proj over rank-16 weights for all seven projections, beside a
    q/v adapter of rank 16, on 7 pages per group: charged by its config the two would fit the
    q/k/v group (4 + 4 > 7 only with its real q/k/v weights), and the worker would refuse the
    step for every request in it. Charged by its weights' header they take turns."""
    folder = tmp_path_factory.mktemp("mislabelled")
    specs = (
        DemoAdapterSpec("understated", 16, 32, ALL_PROJECTIONS, seed=51),
        DemoAdapterSpec("qv-r16", 16, 32, ["q_proj", "v_proj"], seed=52),
    )
    paths = {}
    for spec in specs:
        build_adapter(demo.base, folder / spec.name, spec)
        paths[spec.name] = folder / spec.name
    config_path = paths["understated"] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["o_proj"]
    config_path.write_text(json.dumps(config))
    jobs = [("understated", prompt_ids[0]), ("qv-r16", prompt_ids[1])] * 2
    out, log = run_engine(
        tmp_path,
        demo,
        paths,
        jobs,
        max_loras=2,
        pool_bytes=7 * PAGE_SIZE * ROW_BYTES,
        max_lora_rank=16,
    )
    assert out["error"] is None, (out["error"], log[-4000:])
    assert all(len(tokens) == MAX_TOKENS for tokens in out["outputs"])
    assert out["stats"]["refusals_total"] == 0
    # the q/v adapter's answers are exactly its own (the other's config no longer describes
    # its weights, so peft's reference would not either)
    check_outputs(demo, paths, jobs[1::2], out["outputs"][1::2])
