"""The SGMV benchmark runs end to end in its smoke mode and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.kernels import bench_sgmv


def test_smoke_run_writes_json_and_markdown(tmp_path: Path) -> None:
    assert bench_sgmv.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "sgmv_smoke.json").read_text())
    assert report["environment"]["smoke"] is True
    assert report["copy_gbps"] > 0
    assert {r["case"] for r in report["rows"]} == {c.name for c in bench_sgmv.make_cases(True)}
    for row in report["rows"]:
        assert row["sgmv_ms"] > 0 and row["padded_ms"] > 0 and row["torch_ref_ms"] > 0
        assert row["bytes_min"] > 0
    table = (tmp_path / "sgmv_smoke.md").read_text()
    assert "SMOKE RUN" in table and "qkv-T40-mixed8-64" in table
