"""The benchmarks run and print their JSON (their figures are for docs/BENCHMARKS.md, never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(name: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_decode_benchmark_compares_against_transformers_on_the_same_tokens():
    report = run_benchmark("decode.py", "--quick", "--threads", "2", "--batch", "2")
    assert report["same_greedy_tokens_as_transformers"] is True
    assert set(report["batch1_tokens_per_s"]) == {"ours", "transformers", "ours_without_cpu_layout"}
    assert all(rate > 0 for rate in report["batch1_tokens_per_s"].values())
    assert report["bandwidth_limit"]["limit_tokens_per_s"] > 0


@pytest.mark.slow
def test_serve_load_benchmark_drives_a_real_server():
    report = run_benchmark("serve_load.py", "--quick", "--preset", "tiny", "--clients", "1,2")
    assert [r["clients"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        assert result["completion_tokens"] == 16 * result["requests"]
