"""Side-by-side serving benchmark: loraplex vs vLLM's own OpenAI server, same model and load.

    python -m benchmarks.serve             # the full run (issue 8 settings), 6-10 min on 2 cores
    python -m benchmarks.serve --quick     # smoke settings, under 3 minutes on 2 cores

See benchmarks/serve/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.serve import report, runner, servers
from benchmarks.serve.assets import Assets, prepare_assets
from benchmarks.serve.load import Sample
from benchmarks.serve.scenarios import (
    FULL_SCENARIOS,
    FULL_SETTINGS,
    QUICK_SETTINGS,
    with_engine_overrides,
)
from benchmarks.serve.servers import SYSTEMS

logger = logging.getLogger("benchmarks.serve")

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parent / "data"
FULL_OUT = HERE.parent / "results" / "serve"
QUICK_OUT = HERE.parent / "results" / "tmp" / "serve-quick"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke settings (fewer, shorter requests; one server per system)",
    )
    parser.add_argument(
        "--out", type=Path, help=f"results folder (default {FULL_OUT}, --quick: {QUICK_OUT})"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DATA_DIR,
        help="cache of the generated base model and adapters (git-ignored)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma list, baseline first (its closed-loop req/s sets open-loop rates)",
    )
    parser.add_argument(
        "--scenarios",
        help="comma list of scenario names (default all: "
        + ", ".join(s.name for s in FULL_SCENARIOS)
        + ")",
    )
    parser.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="[SCENARIO/]SYSTEM:K=V",
        help="engine flag for one system (LORAPLEX_K / --k); repeatable",
    )
    parser.add_argument(
        "--open-rate",
        action="append",
        default=[],
        metavar="[SCENARIO=]R",
        help="fixed open-loop req/s instead of --open-load x the baseline's "
        "closed-loop req/s; repeatable",
    )
    share = parser.add_mutually_exclusive_group()
    share.add_argument(
        "--share-servers",
        dest="share",
        action="store_true",
        default=None,
        help="one server per system for all scenarios (default with --quick)",
    )
    share.add_argument("--no-share-servers", dest="share", action="store_false")
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="one server up at a time, the systems one after the other (for engines whose "
        "memory does not fit twice, a GPU at a high gpu_memory_utilization); a drift in the "
        "machine's speed then falls on one system",
    )
    for field in dataclasses.fields(FULL_SETTINGS):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            help=f"default {field.default} (quick: {getattr(QUICK_SETTINGS, field.name)})",
        )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(settings)
        if getattr(args, f.name) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    try:
        scenarios = with_engine_overrides(FULL_SCENARIOS, args.engine)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if args.scenarios:
        wanted = args.scenarios.split(",")
        unknown = set(wanted) - {s.name for s in scenarios}
        if unknown:
            raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
        scenarios = tuple(s for s in scenarios if s.name in wanted)
    systems = tuple(args.systems.split(","))
    if set(systems) - set(SYSTEMS):
        raise SystemExit(f"--systems: expected names from {SYSTEMS}")
    share = args.quick if args.share is None else args.share
    out_dir = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    plan = runner.RunPlan(
        scenarios,
        settings,
        systems,
        share_servers=share,
        open_rates=_open_rates(args.open_rate),
        in_turns=not args.one_at_a_time,
    )

    client_raised = servers.raise_client_priority()
    started = time.monotonic()
    meta = {
        "date": report.now_utc(),
        "command": shlex.join(["python", "-m", "benchmarks.serve", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "machine": report.machine_info(),
        "versions": report.software_versions(),
        "settings": {**dataclasses.asdict(settings), "open_rates": plan.open_rates},
        "systems": list(systems),
        "share_servers": share,
        "in_turns": plan.in_turns,
        "client_nice": servers.CLIENT_NICE if client_raised else 0,
    }
    assets = prepare_assets(args.data_dir, max(s.adapters for s in scenarios), seed=settings.seed)
    try:
        measured = _run_with_progress(plan, assets, args.data_dir / "logs")
    except runner.RunAborted as aborted:
        # Minutes of finished scenarios are kept for a look, apart from the committed files.
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / "partial-results.json"
        meta["aborted"] = repr(aborted.__cause__)
        partial.write_text(json.dumps({"meta": meta, **aborted.partial}, indent=1, default=str))
        print(f"run stopped part way ({aborted.__cause__!r}); what it measured: {partial}")
        raise
    results = {"meta": meta, **measured}
    (out_dir / "partial-results.json").unlink(missing_ok=True)  # an earlier run's, now stale
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["load_average_end"] = report.machine_info()["load_average"]
    for path in report.write_all(results, out_dir):
        print(f"wrote {path}")
    errors = sum(
        phase["errors"]
        for sc in results["scenarios"]
        for data in sc["systems"].values()
        for phase in data["phases"].values()
    )
    print(f"done in {meta['duration_s']:.0f} s, {errors} failed requests")
    for sc in results["scenarios"]:
        for phase, counts in (sc.get("output_agreement") or {}).items():
            if counts["compared"] and counts["identical"] < counts["compared"] / 2:
                # Numerics flip some near-tie tokens; most outputs differing is a mix-up.
                print(
                    f"WARNING {sc['name']} {phase}: only {counts['identical']} of "
                    f"{counts['compared']} outputs identical between the systems"
                )
    return 1 if errors else 0


def _open_rates(items: list[str]) -> dict[str, float]:
    rates = {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            rates[name] = float(value)
        except ValueError:
            raise SystemExit(f"--open-rate {item!r}: expected [SCENARIO=]REQ_PER_S") from None
        if rates[name] <= 0:
            raise SystemExit(f"--open-rate {item!r}: the rate must be positive")
    return rates


def _run_with_progress(plan: runner.RunPlan, assets: Assets, log_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    errors = 0
    with (
        tqdm(total=plan.total_requests(), unit="req", dynamic_ncols=True) as bar,
        logging_redirect_tqdm(),
    ):

        def step(label: str) -> None:
            bar.set_description(label)

        def advance(sample: Sample) -> None:
            nonlocal errors
            errors += sample.error is not None
            bar.set_postfix(errors=errors, refresh=False)
            bar.update()

        return runner.run(plan, assets, log_dir, runner.Progress(step, advance))


if __name__ == "__main__":
    sys.exit(main())
