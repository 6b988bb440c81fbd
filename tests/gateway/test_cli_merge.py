"""`loraplex merge`: an offline command on local folders (registry.merge_weights). Its output
is the merge's record; an operator's mistake is exit status 2 naming it, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from gateway.cli import app

QKVO, ALL = "demo-qkvo-r8", "demo-all-r16"


def test_merge_writes_the_checkpoint_and_prints_its_record(demo, tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app,
        ["merge", str(demo.base), str(demo.adapters[QKVO]), f"{demo.adapters[ALL]}:0.5",
         "--out", str(out), "--method", "ties", "--density", "0.4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["out"] == str(out) and record["method"] == "ties" and record["density"] == 0.4
    assert [(a["path"], a["weight"]) for a in record["adapters"]] == [
        (str(demo.adapters[QKVO]), 1.0),
        (str(demo.adapters[ALL]), 0.5),
    ]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "average"], "--method"),
        (["--density", "0"], "--density"),
        (["--density", "nan"], "--density"),
        (["--density", "0.5"], "applies to --method ties only"),
    ],
)
def test_bad_options_exit_2_and_write_nothing(demo, tmp_path, extra, message):
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app, ["merge", str(demo.base), str(demo.adapters[QKVO]), "--out", str(out), *extra]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and not out.exists()


@pytest.mark.parametrize("suffix", [":heavy", ":inf"])
def test_a_weight_that_is_not_a_number_exits_2(demo, tmp_path, suffix):
    result = CliRunner().invoke(
        app,
        ["merge", str(demo.base), f"{demo.adapters[QKVO]}{suffix}", "--out", str(tmp_path / "m")],
    )
    assert result.exit_code == 2 and "must be a number" in result.output


def test_a_missing_adapter_folder_or_an_existing_destination_exits_2(demo, tmp_path):
    missing = CliRunner().invoke(
        app, ["merge", str(demo.base), str(tmp_path / "nope"), "--out", str(tmp_path / "m")]
    )
    assert missing.exit_code == 2 and "no such adapter folder" in missing.output
    (tmp_path / "taken").mkdir()
    taken = CliRunner().invoke(
        app, ["merge", str(demo.base), str(demo.adapters[QKVO]), "--out", str(tmp_path / "taken")]
    )
    assert taken.exit_code == 2 and "exists" in taken.output


def test_a_folder_that_is_no_model_exits_2_not_a_traceback(demo, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        app,
        ["merge", str(tmp_path / "empty"), str(demo.adapters[QKVO]), "--out", str(tmp_path / "m")],
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.output.startswith("error:") and not (tmp_path / "m").exists()
