"""Decode speed and int8 accuracy: our engine against transformers' `generate()` on the same weights.

The `small-100m` shape (or `--preset`) without the final block (so it is exactly a LlamaForCausalLM), random
weights, greedy. Every figure comes from one process, the implementations interleaved, medians
over repeats: decode tokens/s = (N - 1) / (time to generate N tokens - time to generate 1), which
removes the prefill.

- CPU: ours as `Engine.from_checkpoint` prepares it (fp32, `cpu_layout.py`), the same with the
  decode step compiled (`--compile`: AOTInductor, `aot_step.py`; with `--with-torch-compile` also
  through torch.compile, as before), ours with int8 weights (`quantize.py`, `--quantize int8`),
  ours without the CPU layout, and transformers (fp32).
- CUDA: ours (bf16) with the decode step compiled and replayed from CUDA graphs, the same with
  every step launched only after the host has read the one before (`ours_not_running_ahead`; by
  default a step runs ahead, decoding.StaticDecodeStep), the same sampling at temperature 1
  (`ours_sampled`, seeded, the ids drawn inside the graph), at batch 1 an experiment: every
  product of the step written as a sum for inductor to fuse (`ours_one_row_sums`,
  `cpu_layout.prepare_for_gpu_decode(one_row_as_sum=True)`), ours eager without graphs, and
  transformers (bf16); batched figures at every size of `--batch` (default 8 and 64 on CUDA).

Our batch-1 figure is also given as a fraction of the memory-bandwidth limit: bytes read per token
(every weight but the embedding table, plus the KV cache) over a read bandwidth this script
measures itself (summing a tensor far larger than the caches, between the batch-1 repeats; the
median); int8 against its own limit.

The int8 figures' accuracy cost (CPU): teacher-forced through the decode path, the fp32 model
picks the tokens and at every position both models' argmax and logits are compared
(`quantize.compare_decoding`), over fixed chat prompts (held-out synthetic problems): on this
run's random weights and, with `--checkpoint DIR`, on a trained checkpoint.

    python benchmarks/decode.py [--quick] [--device cpu|cuda] [--threads N] [--checkpoint DIR]

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
from collections.abc import Callable, Sequence

import torch
from torch import nn

from reasoning_llama.cli.model_dir import model_dir_argument
from reasoning_llama.config import ModelConfig, get_preset
from reasoning_llama.cpu_layout import prepare_for_cpu_decode, prepare_for_gpu_decode
from reasoning_llama.decoding import DynamicDecodeStep, StaticDecodeStep
from reasoning_llama.evaluation import synthetic_test_rows
from reasoning_llama.generation import Engine, resolve_device
from reasoning_llama.interop.names import to_hf_config, to_hf_state_dict
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import load_model
from reasoning_llama.quantize import compare_decoding, quantize_int8
from reasoning_llama.sampling import SamplingParams
from reasoning_llama.tokenizer import PAD, get_tokenizer

# The quickstart's families and difficulty: prompts a quickstart checkpoint knows how to answer.
AGREEMENT_FAMILIES = ("chain_sum", "sort_digits", "max_digit")
AGREEMENT_DIFFICULTY = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="Few tokens and one repeat: checks that it runs."
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto.")
    parser.add_argument(
        "--preset", default="small-100m", help="Model shape [small-100m; the tests use tiny]."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="Prompt length [128; quick 32].")
    parser.add_argument("--new-tokens", type=int, default=None, help="Tokens generated [128; quick 16].")
    parser.add_argument("--repeats", type=int, default=None, help="Timed repeats per figure [5; quick 1].")
    parser.add_argument(
        "--batch", default=None, help="Batch sizes of the batched figures, comma-separated [8; CUDA 8,64]."
    )
    parser.add_argument("--skip-hf-batched", action="store_true", help="Leave out transformers at batch > 1.")
    parser.add_argument(
        "--with-torch-compile",
        action="store_true",
        help="CPU: also the decode step through torch.compile, as the engine compiled it before AOTInductor.",
    )
    parser.add_argument(
        "--checkpoint",
        type=model_dir_argument,  # a checkpoint or a run directory, found before minutes of timing
        default=None,
        help="Also measure int8's accuracy cost on this trained checkpoint (or a run's best).",
    )
    parser.add_argument(
        "--agreement-prompts",
        type=int,
        default=None,
        help="Prompts per family for int8 accuracy [8; quick 1].",
    )
    parser.add_argument(
        "--agreement-tokens",
        type=int,
        default=None,
        help="Tokens per prompt for int8 accuracy [64; quick 16].",
    )
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


class ReadBandwidth:
    """Bytes/s of summing a 512 MiB fp32 tensor (far beyond any cache), sampled between the timed
    repeats: a shared machine's memory bandwidth drifts by half over minutes, so the limit is
    measured beside the figure it bounds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.x = torch.ones(128 * 1024 * 1024, device=device)
        self.x.sum()
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(self.x.numel() * self.x.element_size() / timed(self.x.sum, self.device))


class Phases:
    """Wall seconds of each part of the run, so a slow run (a GPU lease is short) says where its time went."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now


def copy_of(model: Transformer) -> Transformer:
    copy = Transformer(model.config).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def agreement_prompts(per_family: int) -> list[list[int]]:
    tokenizer = get_tokenizer()
    rows = synthetic_test_rows(AGREEMENT_FAMILIES, per_family, difficulty=AGREEMENT_DIFFICULTY)
    return [tokenizer.render_prompt([{"role": "user", "content": row["user"]}]) for row in rows]


def int8_accuracy(reference: Transformer, prompts: Sequence[Sequence[int]], new_tokens: int) -> dict:
    candidate = copy_of(reference)
    quantize_int8(candidate)
    return compare_decoding(reference, candidate, prompts, new_tokens).as_dict()


def bytes_per_token(config: ModelConfig, kv_values: float, linear_bytes: int, other_bytes: int) -> float:
    """Bytes one batch-1 decode step reads: the linear weights at `linear_bytes` each; the other
    weights (of the embedding, one row) and the KV cache at `other_bytes`."""
    with torch.device("meta"):
        model = Transformer(config)
    embedding = model.embed
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    other = (
        sum(p.numel() for p in model.parameters())
        - linear
        - embedding.weight.numel()
        + embedding.embedding_dim
    )
    return linear * linear_bytes + (other + kv_values) * other_bytes


def main() -> None:
    args = parse_args()
    phases = Phases()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt_len = args.prompt_tokens or (32 if args.quick else 128)
    new_tokens = args.new_tokens or (16 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 5)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batches = [int(b) for b in (args.batch or ("8,64" if cuda else "8")).split(",")]
    dtype = torch.bfloat16 if cuda else torch.float32

    from transformers import LlamaConfig, LlamaForCausalLM

    config = dataclasses.replace(get_preset(args.preset), final_block=False)
    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(config).to(dtype).eval()
        hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(config))).to(dtype).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()))
    tokenizer = get_tokenizer()
    most = max(batches)
    engines: dict[str, Engine] = {}
    layout = None
    compile_s: dict[str, float] = {}  # compiling (and capturing) before the first token
    if cuda:
        sums = copy_of(ours).to(device, dtype)
        prepare_for_gpu_decode(ours)  # as Engine.from_checkpoint does
        prepare_for_gpu_decode(sums, one_row_as_sum=True)
        for name, model, rows in (("ours", ours, most), ("ours_one_row_sums", sums, 1)):
            start = time.perf_counter()
            engines[name] = Engine(model, tokenizer, max_batch_size=rows, compile=True, cuda_graphs=True)
            compile_s[name] = time.perf_counter() - start
        engines["ours_without_cuda_graphs"] = Engine(ours, tokenizer, max_batch_size=most)
    else:
        # What Engine.from_checkpoint gives a CPU model, with and without --quantize int8, and the
        # plain model to show what the layout is worth.
        plain = copy_of(ours)
        int8 = copy_of(ours)
        quantize_int8(int8)
        layout = prepare_for_cpu_decode(ours)
        engines["ours"] = Engine(ours, tokenizer, max_batch_size=most)
        start = time.perf_counter()
        engines["ours_compiled"] = Engine(ours, tokenizer, max_batch_size=most, compile=True)
        compile_s["ours_compiled"] = time.perf_counter() - start  # both programs, compiled or loaded
        if args.with_torch_compile:
            engines["ours_torch_compile"] = Engine(ours, tokenizer, max_batch_size=most)
            engines["ours_torch_compile"].decode_step = DynamicDecodeStep(
                ours, engines["ours_torch_compile"].cache, compile=True
            )
        engines["ours_int8"] = Engine(int8, tokenizer, max_batch_size=most)
        engines["ours_without_cpu_layout"] = Engine(plain, tokenizer, max_batch_size=1)

    generator = torch.Generator().manual_seed(1)
    shorter_by = max(1, prompt_len // (4 * most))  # batched prompts differ in length by up to 25%
    prompts = [
        torch.randint(0, 50000, (prompt_len - shorter_by * i,), generator=generator).tolist()
        for i in range(most)
    ]

    def run_engine(name: str) -> Callable[[int, int], list[list[int]]]:
        def run(batch: int, n: int) -> list[list[int]]:
            results = engines[name].generate_batch(prompts[:batch], SamplingParams(max_new_tokens=n))
            return [r.token_ids for r in results]

        return run

    def run_not_running_ahead(batch: int, n: int) -> list[list[int]]:
        """The CUDA-graph engine with its greedy steps launched only once the host has read the last."""
        step = engines["ours"].decode_step
        assert isinstance(step, StaticDecodeStep)
        step.run_ahead = False
        try:
            return run_engine("ours")(batch, n)
        finally:
            step.run_ahead = True

    def run_sampled(batch: int, n: int) -> list[list[int]]:
        """The CUDA-graph engine sampling at temperature 1 (the OpenAI API's default), seeded."""
        params = [SamplingParams(max_new_tokens=n, temperature=1.0, seed=i) for i in range(batch)]
        return [r.token_ids for r in engines["ours"].generate_batch(prompts[:batch], params)]

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

    def decode_rate(
        runs: dict[str, Callable[[int, int], list[list[int]]]],
        batch: int,
        between: Callable[[], None] = lambda: None,
    ) -> dict[str, float]:
        """Tokens/s of decoding for each implementation, interleaved: the tokens made beyond the
        first over medians of (T_N - T_1); `between` runs before the first repeat and after each.
        Tokens are counted, since a sampled request may end before N."""
        for run in runs.values():  # warm up: allocations, lazy init
            run(batch, 2)
        times: dict[str, dict[int, list[float]]] = {name: {1: [], new_tokens: []} for name in runs}
        made: dict[str, list[int]] = {name: [] for name in runs}
        between()
        for repeat in range(repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for name in order:
                for n in (new_tokens, 1):
                    outputs: list[list[list[int]]] = []
                    times[name][n].append(timed(lambda: outputs.append(runs[name](batch, n)), device))  # noqa: B023
                    if n == new_tokens:
                        made[name].append(sum(len(ids) for ids in outputs[0]))
            between()
        rates = {}
        for name, by_n in times.items():
            decode_s = statistics.median(by_n[new_tokens]) - statistics.median(by_n[1])
            rates[name] = (statistics.mean(made[name]) - batch) / decode_s
        return rates

    phases.done("setup")  # models, engines, compiling (and capturing)
    if "ours_torch_compile" in engines:  # torch.compile compiles at the first call (one row here)
        compile_s["ours_torch_compile"] = timed(lambda: run_engine("ours_torch_compile")(1, 2), device)
    batch1_tokens = run_engine("ours")(1, new_tokens)
    parity = {"same_greedy_tokens_as_transformers": batch1_tokens == run_hf(1, new_tokens)}
    if cuda:
        without = run_engine("ours_without_cuda_graphs")(1, new_tokens)
        parity["cuda_graphs_same_greedy_tokens_as_without"] = batch1_tokens == without
        parity["running_ahead_same_greedy_tokens_as_not"] = batch1_tokens == run_not_running_ahead(
            1, new_tokens
        )
        # bf16 sums in another order than the library's products: the tokens may part where two are close.
        parity["one_row_sums_same_greedy_tokens"] = (
            run_engine("ours_one_row_sums")(1, new_tokens) == batch1_tokens
        )
    else:
        parity["compiled_same_greedy_tokens"] = run_engine("ours_compiled")(1, new_tokens) == batch1_tokens
        if "ours_torch_compile" in engines:
            parity["torch_compile_same_greedy_tokens"] = (
                run_engine("ours_torch_compile")(1, new_tokens) == batch1_tokens
            )
        parity["int8_same_greedy_tokens_as_fp32"] = run_engine("ours_int8")(1, new_tokens) == batch1_tokens
    phases.done("parity")
    bandwidth = ReadBandwidth(device)
    variants = {"ours_not_running_ahead": run_not_running_ahead, "ours_sampled": run_sampled} if cuda else {}
    batch1 = decode_rate(
        {**{name: run_engine(name) for name in engines}, **variants, "transformers": run_hf},
        1,
        bandwidth.sample,
    )
    phases.done("batch1")
    batched = {}

    def so_far(stage: str) -> None:
        """The figures so far, a line of their own: a run stopped at a time limit keeps them (the full
        report is the last line)."""
        rates = {"batch1_tokens_per_s": {k: round(v, 2) for k, v in batch1.items()}, **batched}
        print(json.dumps({"partial": stage, **rates, **parity, "phase_s": phases.seconds}), flush=True)

    so_far("batch1")
    for batch in batches:
        runs = {name: run_engine(name) for name in engines if engines[name].max_batch_size >= batch}
        runs.update(variants)
        if not args.skip_hf_batched:
            runs["transformers"] = run_hf
        batched[f"batch{batch}_tokens_per_s"] = {k: round(v, 2) for k, v in decode_rate(runs, batch).items()}
        phases.done(f"batch{batch}")
        so_far(f"batch{batch}")

    # The limit at the median bandwidth sampled between the batch-1 repeats (whose rates are
    # medians too); the best sample's stricter limit is reported beside it.
    read_bandwidth = statistics.median(bandwidth.samples)
    kv_values = 2 * config.n_layers * config.n_kv_heads * config.head_dim * (prompt_len + new_tokens / 2)
    element = torch.finfo(dtype).bits // 8
    weight_bytes = bytes_per_token(config, kv_values, element, element)
    limit = read_bandwidth / weight_bytes
    bandwidth_limit = {
        "read_bandwidth_gb_s": round(read_bandwidth / 1e9, 2),
        "read_bandwidth_samples_gb_s": [round(b / 1e9, 1) for b in bandwidth.samples],
        "bytes_per_token_mb": round(weight_bytes / 1e6, 1),
        "limit_tokens_per_s": round(limit, 2),
        "limit_tokens_per_s_at_best_bandwidth": round(max(bandwidth.samples) / weight_bytes, 2),
        "ours_fraction_of_limit": round(batch1["ours"] / limit, 3),
    }
    if not cuda:
        bandwidth_limit["ours_compiled_fraction_of_limit"] = round(batch1["ours_compiled"] / limit, 3)
        if "ours_torch_compile" in batch1:
            bandwidth_limit["ours_torch_compile_fraction_of_limit"] = round(
                batch1["ours_torch_compile"] / limit, 3
            )
    report: dict = {
        "benchmark": "decode",
        "compares": "reasoning_llama Engine vs transformers LlamaForCausalLM.generate, greedy, same weights",
        "compile_s": {name: round(s, 1) for name, s in compile_s.items()},
        "model": f"{args.preset}, final_block=False",
        "batch1_tokens_per_s": {k: round(v, 2) for k, v in batch1.items()},
        "batch1_speedup_vs_transformers": round(batch1["ours"] / batch1["transformers"], 3),
        "target_speedup": 1.5,
        **batched,
        "bandwidth_limit": bandwidth_limit,
        **parity,
    }
    if cuda:
        report["cuda_graphs"] = {
            "batch1_speedup_vs_without": round(batch1["ours"] / batch1["ours_without_cuda_graphs"], 3),
            "batch1_speedup_running_ahead": round(batch1["ours"] / batch1["ours_not_running_ahead"], 3),
            "batch1_sampled_vs_greedy": round(batch1["ours_sampled"] / batch1["ours"], 3),
            "batch1_one_row_sums_vs_products": round(batch1["ours_one_row_sums"] / batch1["ours"], 3),
            # steps launched on the host's inputs, run ahead, and run ahead and used, over the whole run
            "step_counts": dict(engines["ours"].decode_step.counts),
            "target_batch1_tokens_per_s": 3000,
        }
    else:
        int8_bytes = bytes_per_token(config, kv_values, 1, 4)
        bandwidth_limit["int8_bytes_per_token_mb"] = round(int8_bytes / 1e6, 1)
        bandwidth_limit["int8_limit_tokens_per_s"] = round(read_bandwidth / int8_bytes, 2)
        bandwidth_limit["ours_int8_fraction_of_int8_limit"] = round(
            batch1["ours_int8"] * int8_bytes / read_bandwidth, 3
        )
        per_family = args.agreement_prompts or (1 if args.quick else 8)
        tokens = args.agreement_tokens or (16 if args.quick else 64)
        chat_prompts = agreement_prompts(per_family)
        int8_report = {
            "speedup_vs_transformers": round(batch1["ours_int8"] / batch1["transformers"], 3),
            "target_speedup_vs_transformers": 3.0,
            "prompts": len(chat_prompts),
            "random_weights": int8_accuracy(copy_of(plain), chat_prompts, tokens),
        }
        # The headline accuracy: the trained checkpoint's when given, else the random weights'.
        headline = int8_report["random_weights"]
        if args.checkpoint:
            int8_report["checkpoint"] = {
                "path": str(args.checkpoint),
                **int8_accuracy(load_model(args.checkpoint), chat_prompts, tokens),
            }
            headline = int8_report["checkpoint"]
        int8_report["greedy_agreement"] = headline["greedy_agreement"]
        int8_report["max_logit_error"] = headline["max_logit_error"]
        int8_report["mean_logit_error"] = headline["mean_logit_error"]
        report["int8"] = int8_report
        phases.done("int8_accuracy")
    report["phase_s"] = phases.seconds
    report["settings"] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu_layout": layout,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "batches": batches,
        "quick": args.quick,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
