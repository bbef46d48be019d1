"""Where a GPU's time goes: the training step's kernels, the head + loss and attention variants
side by side, and the decode step's graph time against the engine's time per token.

What `train_throughput.py` and `decode.py` measure says how fast; this says why. Figures:

- train: one compiled optimizer step of `train_throughput.py` (small-100m, B x T random tokens),
  profiled: wall ms per step, GPU kernel ms per step (their sum; the rest is the GPU waiting on
  the host), and the kernels that take the most time, grouped by kind (matmuls, attention, fused
  elementwise, optimizer);
- head_loss: forward + backward of the head and loss over every position of that batch: the two
  forms of `linear_cross_entropy`, chunked (the CPU's) and compiled (CUDA's);
- attention: forward + backward of one layer's attention at that shape: FlexAttention with the
  document mask (every row one document) and flash attention's variable-length form (each row one
  sequence, as `train.attention=varlen` calls it) against SDPA's causal flash kernel;
- decode: the batch-1 (and batch-8, -64) CUDA graph's replay time against the engine's time per
  token (the rest is host work between steps), the compiled step's kernels run without the graph,
  and the host's operations per engine step.

    python benchmarks/gpu_profile.py [--device cuda] [--parts head_loss,attention,decode,train] [--quick]

Prints one JSON object. --quick: tiny shapes on any device, to check the script itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile

from reasoning_llama.config import ModelConfig
from reasoning_llama.cpu_layout import prepare_for_gpu_decode
from reasoning_llama.decoding import StaticDecodeStep
from reasoning_llama.generation import Engine, resolve_device
from reasoning_llama.loss import linear_cross_entropy
from reasoning_llama.model import (
    Transformer,
    document_block_mask,
    document_segments,
    varlen_attention_available,
    varlen_causal_attention,
)
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import get_tokenizer
from train_throughput import llama_shape, ours, random_batch, sync

KINDS = {  # first match wins
    "optimizer": r"multi_tensor|adam",
    "attention": r"flex|attention|fmha|flash",
    "matmul": r"gemm|gemv|cutlass|nvjet|xmma|sm90|cublas|splitK|mm_",
    "fused (triton)": r"^triton_",
}


def kind_of(kernel: str) -> str:
    return next((kind for kind, pattern in KINDS.items() if re.search(pattern, kernel, re.I)), "other")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="head_loss,attention,decode,train", help="Which parts, in order.")
    return parser.parse_args()


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def kernel_table(prof: profile, per: int, top: int = 20) -> dict[str, object]:
    """GPU kernels of a profile: ms per step in all, by kind, and the top ones."""
    kernels = [
        e
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0
    ]
    total_us = sum(e.self_device_time_total for e in kernels)
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_device_time_total
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {
        "kernel_ms_per_step": round(total_us / 1e3 / per, 3),
        "kernels_per_step": round(sum(e.count for e in kernels) / per, 1),
        "ms_per_step_by_kind": {k: round(v / 1e3 / per, 3) for k, v in sorted(by_kind.items())},
        "top": [
            {
                "kernel": e.key[:100],
                "kind": kind_of(e.key),
                "ms_per_step": round(e.self_device_time_total / 1e3 / per, 3),
                "calls_per_step": round(e.count / per, 1),
            }
            for e in kernels[:top]
        ],
    }


def host_table(prof: profile, per: int, top: int = 15) -> list[dict[str, object]]:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key[:80],
            "us_per_step": round(e.self_cpu_time_total / per, 1),
            "calls_per_step": e.count / per,
        }
        for e in events[:top]
    ]


def activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]


def train_profile(config: ModelConfig, device: torch.device, rows: int, seq_len: int, steps: int) -> dict:
    step = ours(config, device, compiled=True)
    batch = random_batch(config, rows, seq_len)
    batch = batch.pin_memory() if device.type == "cuda" else batch
    wall = seconds_per_call(lambda: step(batch), device, steps, warmup=3)
    with profile(activities=activities(device)) as prof:
        for _ in range(steps):
            step(batch)
        sync(device)
    return {
        "wall_ms_per_step": round(wall * 1e3, 3),
        "tokens_per_s": round(rows * seq_len / wall),
        **kernel_table(prof, steps),
    }


def head_loss(config: ModelConfig, device: torch.device, rows: int, seq_len: int, calls: int) -> dict:
    n = rows * seq_len
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(n, config.dim, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(config.vocab_size, config.dim, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, config.vocab_size, (n,), device=device)
    row_weights = torch.ones(n, device=device)
    variants = {
        name: functools.partial(
            linear_cross_entropy,
            hidden,
            weight,
            targets,
            row_weights=row_weights,
            dtype=dtype,
            compiled=compiled,
        )
        for name, compiled in (("ours_chunked", False), ("compiled_plain", True))
    }
    out: dict[str, object] = {"rows": n}
    values = {}
    for name, fn in variants.items():

        def forward_backward(fn: Callable[[], torch.Tensor] = fn) -> None:
            fn().backward()
            hidden.grad = weight.grad = None

        values[name] = float(fn().detach())
        out[f"{name}_ms"] = round(seconds_per_call(forward_backward, device, calls) * 1e3, 3)
    out["same_value"] = abs(values["ours_chunked"] - values["compiled_plain"]) <= 1e-3 * abs(
        values["ours_chunked"]
    )
    out["values"] = values
    return out


def attention(config: ModelConfig, device: torch.device, rows: int, seq_len: int, calls: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (rows, config.n_heads, seq_len, config.head_dim)
    kv_shape = (rows, config.n_kv_heads, seq_len, config.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True)
    doc_ids = torch.zeros(rows, seq_len, dtype=torch.long, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    out: dict[str, object] = {"shape": list(shape)}

    def flex_call() -> torch.Tensor:
        return flex(q, k, v, block_mask=document_block_mask(doc_ids), enable_gqa=True)

    def varlen_call() -> torch.Tensor:
        """As the model calls it: rows flattened into one sequence per example, segments built per batch."""
        flat = (t.transpose(1, 2).reshape(rows * seq_len, t.shape[1], config.head_dim) for t in (q, k, v))
        return varlen_causal_attention(*flat, document_segments(doc_ids, per_row=1))

    variants = {
        "flex_document_mask": flex_call,
        "varlen_document_segments": varlen_call,
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }
    if device.type != "cuda":  # neither has a CPU backward pass
        variants.pop("flex_document_mask")
        variants.pop("varlen_document_segments")
    elif not varlen_attention_available():
        variants.pop("varlen_document_segments")
    for name, fn in variants.items():

        def forward_backward(fn: Callable[[], torch.Tensor] = fn) -> None:
            fn().sum().backward()
            q.grad = k.grad = v.grad = None

        out[f"{name}_ms"] = round(seconds_per_call(forward_backward, device, calls) * 1e3, 3)
    block = seconds_per_call(lambda: document_block_mask(doc_ids), device, calls)
    out["block_mask_build_ms"] = round(block * 1e3, 3)
    return out


def decode(config: ModelConfig, device: torch.device, batches: list[int], new_tokens: int) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = Transformer(config).to(device, dtype).eval()
    if cuda:
        prepare_for_gpu_decode(model)  # as Engine.from_checkpoint does
    tokenizer = get_tokenizer()
    engine = Engine(model, tokenizer, max_batch_size=max(batches), compile=cuda, cuda_graphs=cuda)
    step = engine.decode_step
    prompt = list(range(1000, 1128))
    out: dict[str, object] = {}

    def generate(n: int) -> None:
        engine.generate(prompt, SamplingParams(max_new_tokens=n))

    per_token = (
        seconds_per_call(lambda: generate(new_tokens + 1), device, 3)
        - seconds_per_call(lambda: generate(1), device, 3)
    ) / new_tokens
    out["engine_us_per_token_batch1"] = round(per_token * 1e6, 1)
    if cuda:
        assert isinstance(step, StaticDecodeStep)
        replay = {}
        for size in batches:
            replay[size] = seconds_per_call(functools.partial(step.replay, size), device, 200, warmup=10)
        out["graph_replay_us"] = {str(s): round(t * 1e6, 1) for s, t in replay.items()}
        # A token's time beyond its graph's replay: the host's work that running ahead did not hide
        # (before running ahead, the host's whole share; 163 µs on the H200 of 2026-12-04).
        out["unhidden_host_us_per_token_batch1"] = round((per_token - replay[1]) * 1e6, 1)
    else:  # a CPU engine decodes with other steps: the static step's code, eager, checks this part
        step = StaticDecodeStep(model, engine.cache, cuda_graphs=False, compile=False)
    one_step = functools.partial(step.run_uncaptured, 1)
    out["compiled_step_without_graph_us" if cuda else "eager_static_step_us"] = round(
        seconds_per_call(one_step, device, 50) * 1e6, 1
    )
    with profile(activities=activities(device)) as prof:
        for _ in range(10):
            one_step()
        sync(device)
    out["batch1_step_kernels"] = kernel_table(prof, 10, top=12)
    with profile(activities=activities(device)) as prof:
        generate(33)
    out["engine_host_ops_per_token"] = host_table(prof, 32)
    return out


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    preset, rows, seq_len = ("tiny", 2, 128) if args.quick else ("small-100m", 16, 1280)
    config = llama_shape(preset, seq_len)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    calls = 2 if args.quick else 10
    report: dict[str, object] = {
        "benchmark": "gpu_profile",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"preset": preset, "batch": rows, "seq_len": seq_len},
    }
    parts: dict[str, Callable[[], dict]] = {
        "head_loss": lambda: head_loss(config, device, rows, seq_len, calls),
        "attention": lambda: attention(config, device, rows, seq_len, calls),
        "decode": lambda: decode(config, device, [1, 2] if args.quick else [1, 8], 16 if args.quick else 128),
        "train": lambda: train_profile(config, device, rows, seq_len, 2 if args.quick else 3),
    }
    for name in args.parts.split(","):  # each reported whatever the others do
        part = parts[name]
        start = time.perf_counter()
        try:
            report[name] = part()
        except Exception as e:  # a profile reports what broke and goes on
            report[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        report[f"{name}_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
