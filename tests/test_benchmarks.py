"""The benchmarks run and print their JSON (their figures are for docs/BENCHMARKS.md, never asserted)."""

import json
import os
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


@pytest.fixture(scope="module")
def cpu_suite(tmp_path_factory) -> tuple[dict, Path]:
    """`gpu_suite.sh` with tiny shapes on the CPU, once: its report and folder. Its steps run the
    decode and throughput benchmarks (`--quick`), whose own tests below read them from the report."""
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_suite.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "report.json").read_text()), out


def step_result(suite: tuple[dict, Path], step: str) -> dict:
    report, out = suite
    assert report[step]["status"] == "ok", (out / f"{step}.log").read_text()[-2000:]
    return report[step]["result"]


@pytest.mark.slow
def test_decode_benchmark_compares_against_transformers_on_the_same_tokens(cpu_suite):
    report = step_result(cpu_suite, "decode")  # decode.py --quick --preset tiny --batch 2, 1 thread
    assert report["model"] == "tiny, final_block=False"
    assert report["same_greedy_tokens_as_transformers"] is True
    ours = {"ours", "ours_compiled", "ours_int8"}
    assert set(report["batch1_tokens_per_s"]) == {*ours, "transformers", "ours_without_cpu_layout"}
    assert all(rate > 0 for rate in report["batch1_tokens_per_s"].values())
    assert set(report["batch2_tokens_per_s"]) == {*ours, "transformers"}
    assert report["compiled_same_greedy_tokens"] is True and report["compile_s"]["ours_compiled"] > 0
    limit = report["bandwidth_limit"]
    assert limit["limit_tokens_per_s"] > 0 and limit["ours_fraction_of_limit"] > 0
    assert limit["ours_compiled_fraction_of_limit"] > 0
    # sampled before the batch-1 repeats and after each (one with --quick); the limit at their median
    assert len(limit["read_bandwidth_samples_gb_s"]) == 2
    assert limit["limit_tokens_per_s_at_best_bandwidth"] >= limit["limit_tokens_per_s"]
    # The figures so far come a line at a time, so a run cut at a time limit keeps them.
    stdout = (cpu_suite[1] / "decode.log").read_text().split("--- stdout\n")[1].split("\n--- stderr")[0]
    partial = [json.loads(line) for line in stdout.strip().splitlines()[:-1]]
    assert [p["partial"] for p in partial] == ["batch1", "batch2"]
    assert partial[0]["batch1_tokens_per_s"] == report["batch1_tokens_per_s"]
    assert limit["int8_limit_tokens_per_s"] > limit["limit_tokens_per_s"]  # a quarter of the bytes, mostly
    int8 = report["int8"]
    assert int8["prompts"] == 3 and int8["random_weights"]["tokens"] == 3 * 16
    assert 0 <= int8["greedy_agreement"] <= 1 and 0 <= int8["mean_logit_error"] <= int8["max_logit_error"]
    assert isinstance(report["int8_same_greedy_tokens_as_fp32"], bool)  # reported, not required


@pytest.mark.slow
def test_serve_load_benchmark_drives_a_real_server():
    report = run_benchmark("serve_load.py", "--quick", "--preset", "tiny", "--clients", "1,2")
    assert [r["clients"] for r in report["results"]] == [1, 2]
    for result in report["results"]:
        assert result["completion_tokens"] == 16 * result["requests"]


@pytest.mark.slow
def test_train_throughput_benchmark_compares_against_transformers_and_padding(cpu_suite):
    report = step_result(cpu_suite, "throughput")  # train_throughput.py --quick
    assert set(report["tokens_per_s"]) == {"ours", "transformers"}
    assert all(rate > 0 for rate in report["tokens_per_s"].values())
    flops = report["flops_per_token"]
    assert flops["total"] == flops["dense"] + flops["attention"] > 0
    assert "mfu" not in report  # no peak for a CPU unless one is given
    variable = report["variable_length"]
    assert variable["packed"]["loss_tokens_per_s"] > 0 and variable["padded"]["loss_tokens_per_s"] > 0


@pytest.mark.slow
def test_rl_gain_benchmark_runs_every_arm(tmp_path):
    report = run_benchmark("rl_gain.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    assert report["recipe"] == "rl-max-digit"
    families = {"acc/chain_sum", "acc/sort_digits", "acc/max_digit"}
    arms = ("start", "rl", "control", "control_with_traces")
    for arm in arms:
        assert families <= set(report[arm]), arm
        assert all(0 <= report[arm][k] <= 1 for k in families)
        assert set(report["learned"][arm]) == families, arm
    assert min(report[f"{arm}_steps"] for arm in ("rl", "control", "control_with_traces")) >= 1
    traces = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert traces and all(
        row["reasoning"] and set(row) == {"user", "reasoning", "assistant"} for row in traces
    )
    plain = report["without_reasoning"]
    assert plain["steps"] >= 1 and {"acc/data", "pass@4/data"} <= set(plain["after"])
    rows = [json.loads(line) for line in (tmp_path / "longer_sums.jsonl").read_text().splitlines()]
    assert all(set(row) == {"user", "assistant"} for row in rows)  # no reasoning given


@pytest.mark.parametrize(("script", "flag"), [("decode.py", "--checkpoint"), ("rl_gain.py", "--start")])
def test_a_benchmarks_model_is_checked_before_timing(tmp_path, script, flag):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", flag, str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        f"{script}: error: argument {flag}: checkpoint directory {tmp_path / 'nope'} does not exist"
    )


def test_flops_per_token_of_small_100m_written_out():
    sys.path.insert(0, str(BENCHMARKS))
    from reasoning_llama.config import get_preset
    from train_throughput import flops_per_token

    config = get_preset("small-100m")
    flops = flops_per_token(config, 1280)
    # 6 layers x (2 x 768^2 + 2 x 768 x 384 + 3 x 768^2) + final block 3 x 768^2 + head 50263 x 768
    assert flops["matmul_parameters"] == 6 * 3_538_944 + 1_769_472 + 38_601_984
    assert flops["attention"] == 12 * 6 * 8 * 96 * 1280


@pytest.mark.slow
def test_gpu_suite_runs_every_step_and_writes_one_report(cpu_suite):
    """The suite's plumbing, with tiny shapes on the CPU (its figures come from a GPU machine)."""
    report, out = cpu_suite
    assert step_result(cpu_suite, "throughput")["tokens_per_s"]["ours"] > 0
    assert step_result(cpu_suite, "decode")["batch1_tokens_per_s"]["ours"] > 0
    assert report["gpu_tests"]["status"] == "ok"  # skipped without a GPU, never failed
    for mode in ("ddp", "fsdp"):
        assert report["data_parallel"][mode]["status"] == "ok", (out / f"dp_{mode}.log").read_text()[-2000:]
    assert report["short_run"]["status"] == "ok" and report["short_run"]["loss_fell"] is True
    profile = step_result(cpu_suite, "profile")
    assert profile["head_loss"]["same_value"] is True
    assert profile["train"]["tokens_per_s"] > 0 and profile["decode"]["engine_us_per_token_batch1"] > 0
    assert not [part for part in ("head_loss", "attention", "decode", "train") if "error" in profile[part]]
    # The checks run at the same time (each starts before any ends); the timed steps run alone.
    spans = {
        name: (step["started_s"], step["started_s"] + step["seconds"])
        for name, step in [*report.items(), *report["data_parallel"].items()]
        if isinstance(step, dict) and "started_s" in step
    }
    checks = [spans[name] for name in ("gpu_tests", "ddp", "fsdp", "short_run")]
    rounding = 0.2  # both figures are rounded to 0.1 s
    assert max(start for start, _ in checks) < min(end for _, end in checks)
    assert spans["throughput"][1] <= spans["decode"][0] + rounding
    assert spans["decode"][1] <= min(start for start, _ in checks) + rounding
    assert max(end for _, end in checks) <= spans["profile"][0] + rounding
    steps = ("throughput", "decode", "gpu_tests", "dp_ddp", "dp_fsdp", "short_run", "profile")
    # What a GPU lease returns: at most 8 files.
    assert sorted(path.name for path in out.iterdir()) == sorted(
        ["report.json", *(f"{s}.log" for s in steps)]
    )
    # The runs' scratch directory (~2 GB of checkpoints) is gone: none piles up run after run.
    assert report["scratch"] and not Path(report["scratch"]).exists()


def test_gpu_suite_skips_what_its_budget_no_longer_holds(tmp_path):
    budget = ["--budget", "0", "--steps", "short_run,throughput"]
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_suite.py"),
            "--out",
            str(tmp_path),
            "--device",
            "cpu",
            *budget,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == ["short_run", "throughput"]
    assert report["throughput"]["status"].startswith("skipped") and report["short_run"]["status"].startswith(
        "skipped"
    )


def test_sampler_benchmark_times_ours_against_a_multinomial_per_row():
    report = run_benchmark("sampler.py", "--rows", "1,4", "--repeats", "2", "--threads", "1")
    assert set(report["ms_per_step"]) == {"1", "4"} == set(report["speedup_vs_plain"])
    assert all(t["ours"] > 0 and t["plain"] > 0 for t in report["ms_per_step"].values())


@pytest.mark.slow
def test_startup_benchmark_times_commands_against_importing_torch():
    source = BENCHMARKS.parent / "src"  # as a baseline too: the option runs, the figures mean nothing here
    report = run_benchmark("startup.py", "--repeats", "1", "--warmup", "0", "--baseline-src", str(source))
    assert set(report["baseline_over_ours"]) == {"help", "generate"}
    commands = {
        "import_torch",
        "import_torch_and_compiler",
        "help",
        "generate",
        "help_baseline",
        "generate_baseline",
    }
    assert set(report["median_s"]) == commands and all(s > 0 for s in report["median_s"].values())
    assert all(ratio > 0 for ratio in report["baseline_over_ours"].values())
