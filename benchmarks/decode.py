"""Decode speed: our engine against transformers' `generate()` on the same random weights.

The `small-100m` shape without the final block (so it is exactly a LlamaForCausalLM), greedy.
On CPU our model gets the layout `Engine.from_checkpoint` gives it (`cpu_layout.py`: oneDNN
linear layers with two or more threads, else weights stored transposed); the figure without it is
reported too.
Both sides are timed the same way, interleaved, medians over repeats: decode tokens/s =
(N - 1) / (time to generate N tokens - time to generate 1), which removes the prefill. Our
batch-1 figure is also given as a fraction of the memory-bandwidth limit: bytes read per
token (every weight but the embedding table, plus the KV cache) over a read bandwidth this
script measures itself (summing a tensor far larger than the caches).

    python benchmarks/decode.py [--quick] [--device cpu|cuda] [--threads N]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from reasoning_llama.config import get_preset
from reasoning_llama.cpu_layout import prepare_for_cpu_decode
from reasoning_llama.generation import Engine, resolve_device
from reasoning_llama.interop.names import to_hf_config, to_hf_state_dict
from reasoning_llama.model import Transformer
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import PAD, get_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="Few tokens and one repeat: checks that it runs."
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="Prompt length [128; quick 32].")
    parser.add_argument("--new-tokens", type=int, default=None, help="Tokens generated [128; quick 16].")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats per figure [5; quick 1].")
    parser.add_argument("--batch", type=int, default=8, help="Batch size of the batched figure.")
    parser.add_argument("--skip-hf-batched", action="store_true", help="Leave out transformers at batch > 1.")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def read_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes/s of summing a 512 MiB fp32 tensor (far beyond any cache), best of `repeats`."""
    x = torch.ones(128 * 1024 * 1024, device=device)
    x.sum()
    best = min(timed(x.sum, device) for _ in range(max(3, repeats)))
    return x.numel() * x.element_size() / best


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_len = args.prompt_tokens or (32 if args.quick else 128)
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 5)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    from transformers import LlamaConfig, LlamaForCausalLM

    config = dataclasses.replace(get_preset("small-100m"), final_block=False)
    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(config).to(dtype).eval()
        hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(config))).to(dtype).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()))
    layout = None
    if device.type == "cpu":
        # Engine.from_checkpoint prepares a CPU model for decoding; keep a plain copy to show what
        # that is worth.
        plain = Transformer(config).eval()
        plain.load_state_dict(ours.state_dict())
        plain_engine = Engine(plain, get_tokenizer(), max_batch_size=1, device=device)
        layout = prepare_for_cpu_decode(ours)
    engine = Engine(ours, get_tokenizer(), max_batch_size=args.batch, device=device)

    generator = torch.Generator().manual_seed(1)
    shorter_by = max(1, prompt_len // (4 * args.batch))  # batched prompts differ in length by up to 25%
    prompts = [
        torch.randint(0, 50000, (prompt_len - shorter_by * i,), generator=generator).tolist()
        for i in range(args.batch)
    ]

    def run_ours(batch: int, n: int) -> list[list[int]]:
        results = engine.generate_batch(prompts[:batch], SamplingParams(max_new_tokens=n))
        return [r.token_ids for r in results]

    def run_ours_without_cpu_layout(batch: int, n: int) -> list[list[int]]:
        return [
            r.token_ids
            for r in plain_engine.generate_batch(prompts[:batch], SamplingParams(max_new_tokens=n))
        ]

    def run_hf(batch: int, n: int) -> list[list[int]]:
        width = max(len(p) for p in prompts[:batch])
        ids = torch.full((batch, width), PAD, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, p in enumerate(prompts[:batch]):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = hf.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=PAD,
            )
        return out[:, width:].tolist()

    def decode_rate(runs: dict[str, Callable[[int, int], object]], batch: int) -> dict[str, float]:
        """Tokens/s of decoding for each implementation, interleaved, medians of (T_N - T_1)."""
        for run in runs.values():  # warm up: allocations, lazy init
            run(batch, 2)
        times: dict[str, dict[int, list[float]]] = {name: {1: [], new_tokens: []} for name in runs}
        for repeat in range(repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for name in order:
                for n in (new_tokens, 1):
                    times[name][n].append(timed(lambda: runs[name](batch, n), device))  # noqa: B023
        rates = {}
        for name, by_n in times.items():
            decode_s = statistics.median(by_n[new_tokens]) - statistics.median(by_n[1])
            rates[name] = batch * (new_tokens - 1) / decode_s
        return rates

    same_tokens = run_ours(1, new_tokens) == run_hf(1, new_tokens)
    batch1_runs = {"ours": run_ours, "transformers": run_hf}
    if device.type == "cpu":
        batch1_runs["ours_without_cpu_layout"] = run_ours_without_cpu_layout
    batch1 = decode_rate(batch1_runs, 1)
    batched_runs = {"ours": run_ours} if args.skip_hf_batched else {"ours": run_ours, "transformers": run_hf}
    batched = decode_rate(batched_runs, args.batch)

    bandwidth = read_bandwidth(device, repeats)
    element = torch.finfo(dtype).bits // 8
    weights_read = ours.num_parameters() - ours.embed.weight.numel() + config.dim  # one embedding row
    mean_context = prompt_len + new_tokens / 2
    kv_read = 2 * config.n_layers * config.n_kv_heads * config.head_dim * mean_context
    bytes_per_token = (weights_read + kv_read) * element
    limit = bandwidth / bytes_per_token

    report = {
        "benchmark": "decode",
        "compares": "reasoning_llama Engine vs transformers LlamaForCausalLM.generate, greedy, same weights",
        "model": "small-100m, final_block=False",
        "batch1_tokens_per_s": {k: round(v, 2) for k, v in batch1.items()},
        "batch1_speedup_vs_transformers": round(batch1["ours"] / batch1["transformers"], 3),
        "target_speedup": 1.5,
        f"batch{args.batch}_tokens_per_s": {k: round(v, 2) for k, v in batched.items()},
        "bandwidth_limit": {
            "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "bytes_per_token_mb": round(bytes_per_token / 1e6, 1),
            "limit_tokens_per_s": round(limit, 2),
            "ours_fraction_of_limit": round(batch1["ours"] / limit, 3),
        },
        "same_greedy_tokens_as_transformers": same_tokens,
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "cpu_layout": layout,
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "batch": args.batch,
            "quick": args.quick,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
    }
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
