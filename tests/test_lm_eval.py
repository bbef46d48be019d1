"""lm-evaluation-harness (the real `lm_eval`) against `reasoning-llama serve` on loopback, offline: a
generation task through /v1/chat/completions and a loglikelihood task through /v1/completions, both
the task files README's section ships (docs/lm-eval/), on held-out problems that `reasoning-llama eval`
scores itself. Nothing here knows the right numbers in advance: the harness must agree with our own
evaluator, and its log-probabilities with transformers' on the exported weights."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from cli_helpers import run_cli
from reasoning_llama.tokenizer import get_tokenizer

TASKS = Path(__file__).parent.parent / "docs" / "lm-eval"
FAMILIES = "synthetic:chain_sum,max_digit,sort_digits"  # the quickstart's
BUDGET = "128"  # eval's --max-new-tokens, the task file's max_gen_toks


@contextlib.contextmanager
def serving(checkpoint: Path) -> Iterator[str]:
    """`reasoning-llama serve` in a subprocess on a free loopback port; its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "reasoning_llama", "serve", "--checkpoint", str(checkpoint)]
    command += ["--port", str(port), "--device", "cpu", "--max-concurrency", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{base}/health").raise_for_status()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        yield base
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def lm_eval(out: Path, model: str, model_args: dict[str, str], task: str, *extra: str) -> tuple[dict, list]:
    """Run `lm_eval run` offline in `out` (where problems.jsonl is); its metrics and logged samples."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    command = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args]
    command += ["--tasks", task, "--include_path", str(TASKS), "--log_samples", "--output_path", "results"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(out / "hf-home"),  # the datasets cache of the task file's json stays here
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run([*command, *extra], cwd=out, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-6000:]
    (results_file,) = glob.glob(str(out / "results" / "*" / "results_*.json"))
    (samples_file,) = glob.glob(str(out / "results" / "*" / f"samples_{task}_*.jsonl"))
    for path in (results_file, samples_file):
        os.rename(path, path + ".read")  # the next run's files are then the only ones
    samples = [json.loads(line) for line in Path(samples_file + ".read").read_text().splitlines()]
    return json.loads(Path(results_file + ".read").read_text())["results"][task], samples


@pytest.mark.slow
def test_lm_eval_through_the_server_agrees_with_reasoning_llama_eval(tmp_path):
    trained = run_cli("quickstart", "--fast", "--out", tmp_path / "qs", "--json", one_thread=True)
    assert trained.returncode == 0, trained.stderr
    checkpoint = tmp_path / "qs" / "best"
    ours = run_cli(
        "eval", "--checkpoint", checkpoint, "--task", FAMILIES, "--limit", "4", "--difficulty", "4",
        "--max-new-tokens", BUDGET, "--examples", tmp_path / "problems.jsonl", "--device", "cpu", "--json",
        one_thread=True,
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    ours = json.loads(ours.stdout)
    examples = [json.loads(line) for line in (tmp_path / "problems.jsonl").read_text().splitlines()]
    assert len(examples) == ours["rows"] == 12
    exported = run_cli("export", "--checkpoint", checkpoint, "--to", "hf", tmp_path / "hf", one_thread=True)
    assert exported.returncode == 0, exported.stderr

    with serving(checkpoint) as base:
        chat, chat_samples = lm_eval(
            tmp_path,
            "local-chat-completions",
            {"model": "best", "base_url": f"{base}/v1/chat/completions", "num_concurrent": "8"},
            "reasoning_llama_synthetic",
            "--apply_chat_template",
        )
        loglik, loglik_samples = lm_eval(
            tmp_path,
            "local-completions",
            {
                "model": "best",
                "base_url": f"{base}/v1/completions",
                "num_concurrent": "8",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(tmp_path / "hf"),  # the export's tokenizer files: no download
                "max_length": "256",
            },
            "reasoning_llama_loglikelihood",
            "--batch_size",
            "3",  # several prompts in one request
        )

    # generation: the harness's exact match is eval's, answer by answer
    assert chat["exact_match,none"] == pytest.approx(ours["overall"]["exact_match"])
    by_doc = sorted(chat_samples, key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in by_doc] == [e["answer"] for e in examples]
    assert [bool(s["exact_match"]) for s in by_doc] == [e["correct"] for e in examples]

    # loglikelihood: each answer's log-probability after its question, as transformers computes it
    # from the exported weights (an implementation of the model other than the server's)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokenizer = get_tokenizer()
    greedy = []
    for sample in sorted(loglik_samples, key=lambda s: s["doc_id"]):
        context, continuation = sample["arguments"]["gen_args_0"].values()
        ids, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
        with torch.no_grad():
            logprobs = hf(torch.tensor([ids])).logits[0, len(context_ids) - 1 : -1].log_softmax(-1)
        targets = torch.tensor(ids[len(context_ids) :])
        logprob, is_greedy = map(str, sample["filtered_resps"][0])
        assert float(logprob) == pytest.approx(float(logprobs.gather(1, targets[:, None]).sum()), abs=1e-3)
        greedy.append(bool((logprobs.argmax(-1) == targets).all()))
        assert (is_greedy == "True") == greedy[-1]
    assert loglik["acc,none"] == pytest.approx(sum(greedy) / len(greedy))
    assert math.isfinite(loglik["perplexity,none"])
