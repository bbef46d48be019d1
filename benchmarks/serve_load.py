"""Server under load: aggregate generated tokens/s and latency at 1, 4, 8 and 16 streaming clients.

Starts `reasoning-llama serve` as a subprocess on a free loopback port, over a random-weight
checkpoint of a preset written to a temporary directory, and drives it with httpx async
clients. Each client sends `--requests` streaming chat completions one after another
(greedy, `--max-tokens` each, distinct prompts). The baseline is one client: the target
is aggregate tokens/s at 8 clients >= 3x one client's (continuous batching must share
decode steps). Per-token latency is the gap between consecutive streamed deltas; time to
first token runs from sending the request to the first reasoning/answer delta.

    python benchmarks/serve_load.py [--preset small-100m] [--clients 1,4,8,16] [--threads N] [--quick]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from reasoning_llama.config import get_preset
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import save_model

MODEL = "bench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small-100m", help="Model shape (random weights).")
    parser.add_argument("--clients", default="1,4,8,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--max-tokens", type=int, default=None, help="Tokens per request [64; quick 16].")
    parser.add_argument("--requests", type=int, default=None, help="Requests per client [2; quick 1].")
    parser.add_argument("--max-concurrency", type=int, default=8, help="The server's batch slots.")
    parser.add_argument("--device", default="cpu", help="The server's --device.")
    parser.add_argument(
        "--threads", type=int, default=None, help="The server's torch threads (OMP_NUM_THREADS)."
    )
    parser.add_argument("--quick", action="store_true", help="Few tokens, one request per client.")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, question: str, max_tokens: int) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    delta_times: list[float] = []
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("reasoning_content") or delta.get("content"):
                delta_times.append(time.perf_counter())
    done = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(delta_times)]
    return {
        "ttft_s": delta_times[0] - sent if delta_times else None,
        "gaps_s": gaps,
        "tokens": usage["completion_tokens"] if usage else 0,
        "seconds": done - sent,
    }


async def run_level(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one_client(c: int) -> list[dict]:
            return [
                await one_request(client, f"Client {c}, question {r}: tell me something.", max_tokens)
                for r in range(requests)
            ]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    gaps = [g for r in results for g in r["gaps_s"]]
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "per_request_tokens_per_s_mean": round(
            statistics.mean(r["tokens"] / r["seconds"] for r in results), 2
        ),
        "ttft_p50_s": _round(percentile(ttfts, 0.5)),
        "ttft_p95_s": _round(percentile(ttfts, 0.95)),
        "per_token_latency_p50_s": _round(percentile(gaps, 0.5)),
        "per_token_latency_p95_s": _round(percentile(gaps, 0.95)),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def start_server(checkpoint: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [
        *(sys.executable, "-m", "reasoning_llama", "serve", "--checkpoint", str(checkpoint)),
        *("--port", str(port), "--model-name", MODEL, "--device", args.device),
        *("--max-concurrency", str(args.max_concurrency), "--max-queue", "64"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "REASONING_LLAMA_API_KEY"}  # no auth here
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_healthy(base: str, process: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            return httpx.get(f"{base}/health", timeout=5).json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up") from None
            time.sleep(0.25)


def main() -> None:
    args = parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    requests = args.requests or (1 if args.quick else 2)
    levels = [int(c) for c in args.clients.split(",")]
    config = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Transformer(config)
        parameters = model.num_parameters()
        checkpoint = save_model(Path(tmp) / MODEL, model)
        del model
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        process = start_server(checkpoint, port, args)
        try:
            health = wait_healthy(base, process)
            asyncio.run(run_level(base, 1, 1, max_tokens))  # warm-up: first-call costs out of the figures
            results = [asyncio.run(run_level(base, n, requests, max_tokens)) for n in levels]
        finally:
            process.terminate()
            process.wait(timeout=60)
    by_clients = {r["clients"]: r for r in results}
    speedup = None
    if 1 in by_clients and 8 in by_clients:
        speedup = round(by_clients[8]["aggregate_tokens_per_s"] / by_clients[1]["aggregate_tokens_per_s"], 2)
    print(
        json.dumps(
            {
                "benchmark": "serve_load",
                "compares": "aggregate streamed tokens/s at N concurrent clients against 1 client",
                "target": "aggregate tokens/s at 8 clients >= 3x one client's",
                "speedup_8_vs_1": speedup,
                "target_met": None if speedup is None else speedup >= 3.0,
                "preset": args.preset,
                "parameters": parameters,
                "max_tokens": max_tokens,
                "requests_per_client": requests,
                "max_concurrency": args.max_concurrency,
                "slots": health["slots"],
                "device": args.device,
                "server_threads": args.threads or "torch default",
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
