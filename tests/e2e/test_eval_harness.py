"""`loraplex eval run` against the real gateway and engine, as an operator runs it: a suite
judged against the base, sentinels pinned from one version and caught moving on another, and
the report handed in with `loraplex adapters evaluate --report`: accepted for the version that
answered it, refused for any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from tests.conftest import ADMIN_TOKEN, BASE_NAME, DEMO_TENANT, cli

SUITE = {
    "name": "e2e stories",
    "min_success": 1.0,
    "cases": [
        {
            "id": "chat",
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 12,
            "checks": [{"type": "max_words", "limit": 1000}],
        },
        {"id": "story", "prompt": "Once upon a time", "max_tokens": 12, "sentinel": True},
        {
            "id": "fox",
            "prompt": "The quick brown fox",
            "max_tokens": 8,
            "checks": [{"type": "not_contains", "text": "\u0000"}],
        },
    ],
}


def run_eval(gateway, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "LORAPLEX_URL": gateway.base_url,
        "LORAPLEX_API_KEY": gateway.api_key,
        "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    return subprocess.run(
        [sys.executable, "-m", "gateway", "eval", "run", *args, "--concurrency", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_suite_run_through_the_gateway_is_the_evidence_for_its_version(gateway, demo, tmp_path):
    name = f"eval-{uuid.uuid4().hex[:6]}"
    for files in ("demo-qkvo-r8", "demo-all-r16"):
        args = ["adapters", "register", str(demo.adapters[files]), "--name", name]
        registered = cli(gateway, *args, "--tenant", DEMO_TENANT)
        assert registered.returncode == 0, registered.stderr
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps(SUITE), encoding="utf-8")
    report, pinned = tmp_path / "report.json", tmp_path / "pinned.json"

    first = run_eval(
        gateway,
        str(suite),
        *("--model", f"{name}@1", "--baseline", BASE_NAME, "--repeat", "2"),
        *("--out", str(report), "--pin-sentinels", str(pinned)),
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pass  task_success" in first.stdout and first.stdout.strip().endswith("passed")
    written = json.loads(report.read_text())
    assert written["passed"] is True and written["baseline"]["model"] == BASE_NAME
    answers = written["candidate"]["generations"]
    assert all(len(a["receipt"]) == 24 for a in answers)  # answer receipts came back
    assert len(answers) == 6 and all(
        a["response_id"].startswith(("cmpl-", "chatcmpl-")) for a in answers
    )
    story = {a["text"] for a in answers if a["case"] == "story"}
    assert len(story) == 1  # greedy: the same answer twice
    pins = json.loads(pinned.read_text())["cases"][1]["checks"]
    assert pins == [{"type": "equals", "text": story.pop().strip()}]

    held = run_eval(gateway, str(pinned), "--model", f"{name}@1")
    assert held.returncode == 0, held.stdout + held.stderr
    assert "pass  sentinels" in held.stdout and "1/1 pinned answers unchanged" in held.stdout
    moved = run_eval(gateway, str(pinned), "--model", f"{name}@2")  # another adapter's weights
    assert moved.returncode == 1, moved.stdout + moved.stderr
    assert "FAIL  sentinels" in moved.stdout and "0/1 pinned answers unchanged" in moved.stdout

    wrong = cli(gateway, "adapters", "evaluate", f"{name}@2", "--report", str(report))
    assert wrong.returncode == 1 and "eval_evidence_invalid" in wrong.stderr, wrong.stderr
    assert f"the report's candidate is '{name}@1', not '{name}@2'" in wrong.stderr
    accepted = cli(gateway, "adapters", "evaluate", f"{name}@1", "--report", str(report))
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["state"] == "evaluated"


def test_a_wrong_key_or_address_and_a_bad_suite_are_usage_errors(gateway, tmp_path):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps(SUITE), encoding="utf-8")
    bad_key = subprocess.run(
        [sys.executable, "-m", "gateway", "eval", "run", str(suite), "--model", BASE_NAME],
        env={**os.environ, "LORAPLEX_URL": gateway.base_url, "LORAPLEX_API_KEY": "nope"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_key.returncode == 2 and "refused LORAPLEX_API_KEY (401)" in bad_key.stderr
    nobody = subprocess.run(
        [sys.executable, "-m", "gateway", "eval", "run", str(suite), "--model", BASE_NAME],
        env={**os.environ, "LORAPLEX_URL": "http://127.0.0.1:9", "LORAPLEX_API_KEY": "k"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nobody.returncode == 2 and "cannot reach the gateway" in nobody.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"cases": [{"id": "a"}]}', encoding="utf-8")
    refused = run_eval(gateway, str(broken), "--model", BASE_NAME)
    assert refused.returncode == 2 and "either `messages`" in refused.stderr
    nowhere = run_eval(
        gateway, str(suite), "--model", BASE_NAME, "--out", str(tmp_path / "no" / "r.json")
    )
    assert nowhere.returncode == 2 and "its folder is missing or read-only" in nowhere.stderr
    no_report = cli(gateway, "adapters", "evaluate", "x@1", "--report", str(tmp_path / "none.json"))
    assert no_report.returncode == 2 and "cannot read the report" in no_report.stderr


FITS = {"type": "max_words", "limit": 1000}


def test_a_suite_the_training_data_held_is_no_evidence(gateway, demo, tmp_path):
    """The operator's whole path: the dataset's filter built and registered with the CLI, the
    suite checked against it (exit 1, the case named), and the report of a real run refused
    for the version whose card lists that dataset."""
    leaked = "Once upon a time there was a little fox who lived in a very big forest"
    suite = tmp_path / "suite.json"
    cases = [
        {"id": "fox-tale", "prompt": leaked, "max_tokens": 6, "checks": [FITS]},
        {"id": "fresh", "prompt": "Write a short poem about the sea and the sky", "checks": [FITS]},
    ]
    tales = {"name": "tales", "min_success": 1.0, "cases": cases}
    suite.write_text(json.dumps(tales), encoding="utf-8")
    train = tmp_path / "train.jsonl"
    rows = [{"prompt": "Tell me a story", "completion": leaked}] + [
        {"text": f"an unrelated training line number {i} about cooking pasta"} for i in range(20)
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    built = cli(gateway, "datasets", "build-filter", str(train), "--register")
    assert built.returncode == 0, built.stderr
    digest = json.loads(built.stdout.split("\n}\n")[0] + "\n}")["dataset_sha256"]
    checked = cli(gateway, "datasets", "contamination", digest, "--suite", str(suite))
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["contaminated"] == ["fox-tale"]
    assert "1 case(s) contaminated" in checked.stderr

    name = f"leak-{uuid.uuid4().hex[:6]}"
    card = tmp_path / "card.json"
    card.write_text(
        json.dumps(
            {
                "owner": "ml@example.com",
                "objective": "sft",
                "datasets": [{"name": "stories", "sha256": digest}],
            }
        ),
        encoding="utf-8",
    )
    args = ["adapters", "register", str(demo.adapters["demo-qkvo-r8"]), "--name", name]
    registered = cli(gateway, *args, "--tenant", DEMO_TENANT, "--card", str(card))
    assert registered.returncode == 0, registered.stderr
    report = tmp_path / "report.json"
    ran = run_eval(gateway, str(suite), "--model", f"{name}@1", "--out", str(report))
    assert ran.returncode == 0, ran.stdout + ran.stderr  # the gates pass on their own
    refused = cli(gateway, "adapters", "evaluate", f"{name}@1", "--report", str(report))
    assert refused.returncode == 1, refused.stderr
    problems = [line for line in refused.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith("  - [eval_contaminated] dataset sha256:")
    assert problems[0].endswith(": fox-tale"), problems
    deleted = cli(gateway, "datasets", "delete-filter", digest)
    assert deleted.returncode == 0 and digest in deleted.stdout
