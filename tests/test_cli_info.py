"""`info` and `tokenize` through the real console entry point, in a subprocess."""

from __future__ import annotations

import json

import pytest

from cli_helpers import run_cli


def test_info_json_reports_parameter_breakdown():
    result = run_cli("info", "--preset", "small-100m", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["parameters"]["total"] == 100_217_088
    assert report["config"]["n_kv_heads"] == 4


def test_info_human_output():
    result = run_cli("info", "--preset", "tiny")
    assert result.returncode == 0
    assert "total" in result.stdout and "embedding" in result.stdout


def test_info_from_checkpoint(tmp_path, tiny_config):
    tiny_config.save(tmp_path / "config.json")
    report = json.loads(run_cli("info", "--checkpoint", str(tmp_path), "--json").stdout)
    assert report["config"]["dim"] == tiny_config.dim


def test_tokenize_json():
    result = run_cli("tokenize", "Hello world", "--json")
    assert json.loads(result.stdout)["ids"] == [15496, 995]


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--preset", "huge"], "unknown preset 'huge'"),
        (["info", "--preset", ""], "unknown preset ''; choose one of: small-100m, tiny"),
        (["info"], "exactly one of --preset or --checkpoint"),
        (["info", "--checkpoint", "/no/such/dir"], "checkpoint directory /no/such/dir does not exist"),
    ],
)
def test_errors_are_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
