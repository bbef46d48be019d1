"""Training throughput and MFU: our training step against transformers' LlamaForCausalLM, same shape.

The model is a preset (default `small-100m`) with the final block off, so both sides are the same
Llama; the batch is B rows of T random tokens, every position carrying loss, plain causal attention.
Each side runs the whole optimizer step (forward, backward, fused AdamW); warm-up steps (compilation
included) are not timed, and the sides are interleaved repeat by repeat, so a noisy machine hits
both alike. Figures:

- tokens/s of ours (compiled layers on CUDA, the training default), ours uncompiled, transformers,
  and on CUDA ours with `train.attention=varlen` (flash attention over each example) instead of
  FlexAttention;
- MFU = tokens/s x FLOPs per token / peak FLOP/s. FLOPs per token (forward + backward) =
  6 x (matmul parameters, the head included, the embedding table not) + 12 x layers x heads x
  head dim x T (attention scores and values, PaLM's convention: the full T x T square, as nanochat
  and torchtitan count it). Peak bf16 FLOP/s is looked up by device name (dense, no sparsity) or
  given with --peak-tflops; on a CPU no MFU is reported unless a peak is given;
- on variable-length data (the synthetic tasks' examples): loss-carrying tokens/s of our packed
  batches against the seed's one example per padded row, same rows per batch (on CUDA the packed
  rows also through varlen attention);
- on CUDA, the time one epoch of a 20M-token dataset would take at our rate.

    python benchmarks/train_throughput.py [--device cuda] [--preset small-100m] [--seq-len 1280]
        [--batch 16] [--steps 10] [--repeats 3] [--quick]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from reasoning_llama.config import ModelConfig, TrainConfig, get_preset
from reasoning_llama.data.batching import Batch, BatchLoader
from reasoning_llama.data.prepare import TokenizedSplit
from reasoning_llama.generation import resolve_device
from reasoning_llama.loss import ModelWithLoss
from reasoning_llama.model import Transformer, varlen_attention_available
from reasoning_llama.tasks import generate_examples
from reasoning_llama.tokenizer import get_tokenizer
from reasoning_llama.training.loop import attention_kind, optimizer_step
from reasoning_llama.training.optim import build_optimizer

# Dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}
EPOCH_TOKENS = 20_000_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto.")
    parser.add_argument("--preset", default="small-100m")
    parser.add_argument("--seq-len", type=int, default=None, help="T [1280 on CUDA, 512 on CPU; quick 64].")
    parser.add_argument(
        "--batch", type=int, default=None, help="Rows per step [16 on CUDA, 4 on CPU; quick 2]."
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="Timed steps per repeat [10; CPU 2; quick 1]."
    )
    parser.add_argument("--repeats", type=int, default=None, help="Interleaved repeats [3; quick 1].")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first [3; quick 1].")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice).")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Peak bf16 TFLOP/s for the MFU.")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-eager", action="store_true", help="Leave out ours uncompiled (CUDA).")
    parser.add_argument(
        "--skip-varlen", action="store_true", help="Leave out ours with varlen attention (CUDA)."
    )
    parser.add_argument("--quick", action="store_true", help="A tiny run that checks the script works.")
    return parser.parse_args()


def flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward + backward FLOPs per trained token (see the module docstring)."""
    d, kv = config.dim, config.n_kv_heads * config.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.ffn_dim  # q, o; k, v; gate, up, down
    matmul = config.n_layers * per_layer + config.vocab_size * d  # + the head
    if config.final_block:
        matmul += 3 * d * config.ffn_dim
    attention = 12 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return {
        "matmul_parameters": matmul,
        "dense": 6.0 * matmul,
        "attention": attention,
        "total": 6.0 * matmul + attention,
    }


def peak_flops(device: torch.device, given_tflops: float | None) -> tuple[float | None, str]:
    if given_tflops:
        return given_tflops * 1e12, "given on the command line"
    if device.type != "cuda":
        return None, "none for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value, f"looked up for {name!r} ({key}, dense bf16)"
    return None, f"unknown device {name!r} (give --peak-tflops)"


def llama_shape(preset: str, seq_len: int) -> ModelConfig:
    """The preset without its final block (exactly a LlamaForCausalLM), long enough for `seq_len`."""
    base = get_preset(preset)
    return ModelConfig.from_dict(
        {**base.to_dict(), "final_block": False, "max_seq_len": max(seq_len, base.max_seq_len)}
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(config: ModelConfig, rows: int, seq_len: int) -> Batch:
    """B rows of T random tokens, one example per row, loss everywhere."""
    ids = torch.randint(0, config.vocab_size - 6, (rows, seq_len + 1))
    return Batch(
        inputs=ids[:, :-1].contiguous(),
        targets=ids[:, 1:].contiguous(),
        loss_mask=torch.ones(rows, seq_len, dtype=torch.bool),
        doc_ids=torch.zeros(rows, seq_len, dtype=torch.long),
        positions=torch.arange(seq_len).expand(rows, seq_len).contiguous(),
        n_loss_tokens=rows * seq_len,
        n_tokens=rows * seq_len,
    )


def ours(
    config: ModelConfig,
    device: torch.device,
    *,
    compiled: bool,
    attention: str = "auto",
    segments_per_row: int = 1,
) -> Callable[[Batch], None]:
    """One optimizer step as `Trainer` takes it (ModelWithLoss, fused AdamW, bf16 autocast on CUDA)."""
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    on_gpu = device.type == "cuda"
    amp = torch.bfloat16 if on_gpu else None
    loss_model = ModelWithLoss(
        model,
        select_positions=not on_gpu,
        attention=attention_kind(attention, device, amp),
        segments_per_row=segments_per_row,
        amp_dtype=amp,
        compile_loss=compiled,
    )
    if compiled:
        for layer in model.layers:
            layer.compile(dynamic=False)
    optimizer = build_optimizer(loss_model, TrainConfig(), device)

    def step(batch: Batch) -> None:
        optimizer_step(loss_model, optimizer, [batch], 1e-4, 1.0, amp, device, skip_nonfinite=False)

    return step


def transformers_llama(config: ModelConfig, device: torch.device) -> Callable[[Batch], None]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from reasoning_llama.interop.names import to_hf_config

    torch.manual_seed(0)
    hf_config = LlamaConfig(**to_hf_config(config), attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    amp = torch.bfloat16 if device.type == "cuda" else None

    def step(batch: Batch) -> None:
        inputs = batch.inputs.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            # transformers shifts the labels itself (T - 1 predictions per row, one fewer than ours).
            loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved_rates(
    sides: dict[str, Callable[[Batch], None]],
    batch: Batch,
    tokens_per_step: int,
    *,
    steps: int,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Median tokens/s of each side, repeats interleaved across sides."""
    for step in sides.values():
        for _ in range(warmup):
            step(batch)
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, step in sides.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(batch)
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: tokens_per_step / statistics.median(t) for name, t in times.items()}


def variable_length(
    config: ModelConfig,
    device: torch.device,
    seq_len: int,
    rows: int,
    steps: int,
    warmup: int,
    *,
    with_varlen: bool = False,
) -> dict[str, object]:
    """Loss tokens/s on synthetic examples: packed rows against one example per padded row."""
    tokenizer = get_tokenizer()
    families = ["chain_sum", "sort_digits", "add", "linear_equation"]
    ids, masks = [], []
    for problem in generate_examples(families, 2000, seed=0, split="train"):
        example = tokenizer.render_example(problem.user, problem.reasoning, problem.assistant)
        if 2 <= len(example.ids) <= seq_len + 1:
            ids.append(np.asarray(example.ids, dtype=np.int32))
            masks.append(np.asarray(example.loss_mask, dtype=np.bool_))
    split = TokenizedSplit(ids=ids, loss_mask=masks)
    out: dict[str, object] = {
        "examples": len(split),
        "mean_example_tokens": float(np.mean([len(x) for x in ids])),
    }
    runs = [("packed", True, "auto"), ("padded", False, "auto")]
    if with_varlen:
        runs.append(("packed_varlen", True, "varlen"))
    for name, packing, attention in runs:
        loader = BatchLoader(split, seq_len=seq_len, batch_size=rows, packing=packing, seed=0)
        step = ours(
            config, device, compiled=False, attention=attention, segments_per_row=loader.segments_per_row
        )
        batches = iter(loader)
        for _ in range(warmup):
            step(next(batches))
        sync(device)
        loss_tokens, start = 0, time.perf_counter()
        for _ in range(steps):
            batch = next(batches)
            step(batch)
            loss_tokens += batch.n_loss_tokens
        sync(device)
        out[name] = {"loss_tokens_per_s": loss_tokens / (time.perf_counter() - start)}
    out["packed_over_padded"] = out["packed"]["loss_tokens_per_s"] / out["padded"]["loss_tokens_per_s"]  # type: ignore[index]
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    preset = "tiny" if args.quick and args.preset == "small-100m" else args.preset
    seq_len = args.seq_len or (64 if args.quick else 1280 if gpu else 512)
    rows = args.batch or (2 if args.quick else 16 if gpu else 4)
    steps = args.steps or (1 if args.quick else 10 if gpu else 2)
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    config = llama_shape(preset, seq_len)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    tokens_per_step = rows * seq_len

    sides: dict[str, Callable[[Batch], None]] = {"ours": ours(config, device, compiled=gpu)}
    with_varlen = gpu and not args.skip_varlen and varlen_attention_available()
    if with_varlen:
        sides["ours_varlen"] = ours(config, device, compiled=True, attention="varlen")
    if gpu and not args.skip_eager:
        sides["ours_uncompiled"] = ours(config, device, compiled=False)
    if not args.skip_transformers:
        sides["transformers"] = transformers_llama(config, device)
    batch = random_batch(config, rows, seq_len)
    if gpu:
        batch = batch.pin_memory()
    rates = interleaved_rates(
        sides, batch, tokens_per_step, steps=steps, repeats=repeats, warmup=warmup, device=device
    )
    flops = flops_per_token(config, seq_len)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    report: dict[str, object] = {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": preset,
        "shape": {"batch": rows, "seq_len": seq_len, "final_block": False},
        "dtype": "bf16 autocast" if gpu else "fp32",
        "steps": steps,
        "repeats": repeats,
        "flops_per_token": flops,
        "peak_flops": peak,
        "peak_source": peak_source,
        "tokens_per_s": rates,
    }
    if peak:
        report["mfu"] = {name: rate * flops["total"] / peak for name, rate in rates.items()}
    if "transformers" in rates:
        report["ours_over_transformers"] = rates["ours"] / rates["transformers"]
    if "ours_varlen" in rates:
        report["varlen_over_flex"] = rates["ours_varlen"] / rates["ours"]
    if "ours_uncompiled" in rates:
        report["compiled_over_uncompiled"] = rates["ours"] / rates["ours_uncompiled"]
    if gpu:
        report["epoch_seconds_20m_tokens"] = EPOCH_TOKENS / rates["ours"]
    report["variable_length"] = variable_length(
        config, device, seq_len, rows, steps, warmup, with_varlen=with_varlen
    )
    print(json.dumps(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
