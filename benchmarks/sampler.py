"""The batched sampler against the plain way of sampling a batch of rows: one JSON object.

Ours is `sampling.sample_rows` (every row of a step together, each with its own generator); the
reference, measured side by side, is what an engine does without it: per row, a softmax at the row's
temperature and `torch.multinomial` with the row's generator. Rows of random logits the size of the
model's vocabulary, temperature 0.7 (no filter), as RL and `n > 1` serving sample them.

    python benchmarks/sampler.py [--rows 1,16,128] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from collections.abc import Callable

import torch

from reasoning_llama.sampling import SamplingParams, sample_rows
from reasoning_llama.tokenizer import N_VOCAB

TEMPERATURE = 0.7


def plain(logits: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """The reference: one softmax and one multinomial draw per row."""
    return [
        int(torch.multinomial(torch.softmax(row / TEMPERATURE, dim=-1), 1, generator=g))
        for row, g in zip(logits, generators, strict=True)
    ]


def seconds_per_call(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,16,128", help="Batch sizes, comma-separated.")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "vocab": N_VOCAB,
        "temperature": TEMPERATURE,
        "ms_per_step": {},
        "speedup_vs_plain": {},
    }
    for n in (int(r) for r in args.rows.split(",")):
        logits = torch.randn(n, N_VOCAB, generator=torch.Generator().manual_seed(n)) * 3
        params = [SamplingParams(temperature=TEMPERATURE)] * n
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        ours = seconds_per_call(functools.partial(sample_rows, logits, params, generators), args.repeats)
        reference = seconds_per_call(functools.partial(plain, logits, generators), args.repeats)
        report["ms_per_step"][str(n)] = {"ours": round(ours * 1e3, 3), "plain": round(reference * 1e3, 3)}
        report["speedup_vs_plain"][str(n)] = round(reference / ours, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
