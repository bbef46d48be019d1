"""Shared by the server tests: a tiny random-weight checkpoint, engines over it, and a real
uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import torch
import uvicorn

from reasoning_llama.config import ModelConfig
from reasoning_llama.generation import Engine
from reasoning_llama.model import Transformer
from reasoning_llama.model_files import save_model
from reasoning_llama.server import Server, ServerSettings, create_app
from reasoning_llama.tokenizer import EOT, IM_END, get_tokenizer

# Small enough that a decode step takes about a millisecond, with the real vocabulary.
TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=256)
MODEL = "tiny-test"


def make_checkpoint(directory: Path, config: ModelConfig = TINY, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model(directory, Transformer(config))


def make_engine(checkpoint: Path, *, max_batch_size: int = 4, logits_hook=None) -> Engine:
    from reasoning_llama.model_files import load_model

    model = load_model(checkpoint)
    return Engine(
        model, get_tokenizer(), max_batch_size=max_batch_size, device="cpu", logits_hook=logits_hook
    )


def scripted_hook(scripts: Mapping[str, tuple[str, str]], *, delay_s: float = 0.0) -> Callable:
    """A logits hook that makes the engine write a fixed (reasoning, answer), then stop.

    The script is the first whose key occurs in the prompt's last user turn ("" matches any);
    `delay_s` per token slows generation down so that tests can watch it stream.
    """
    tokenizer = get_tokenizer()
    encoded = {key: (tokenizer.encode(r), tokenizer.encode(a)) for key, (r, a) in scripts.items()}
    chosen: dict[str, tuple[list[int], list[int]]] = {}
    header = 4  # the engine feeds "\n<|im_start|>assistant\n" itself

    def hook(request, logits: torch.Tensor) -> torch.Tensor:
        if request.id not in chosen:
            last_turn = tokenizer.decode(request.prompt_ids).rsplit("<|im_start|>user", 1)[-1]
            chosen[request.id] = next(ids for key, ids in encoded.items() if key in last_turn)
        reasoning, answer = chosen[request.id]
        done = len(request.output_ids)
        if request.phase == "reasoning":
            script, i = [*reasoning, IM_END], done
        else:
            script, i = [*answer, IM_END, EOT], done - len(reasoning) - 1 - header
        if delay_s:
            time.sleep(delay_s)
        forced = torch.full_like(logits, -float("inf"))
        forced[script[min(i, len(script) - 1)]] = 0.0
        return forced

    return hook


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class RunningServer:
    def __init__(self, url: str, server: uvicorn.Server, engine: Engine) -> None:
        self.url = url
        self.server = server
        self.engine = engine

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Poll /health until no slot is busy and nothing waits; return the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if health["in_flight"] == 0 or time.monotonic() > deadline:
                return health
            time.sleep(0.05)


@contextlib.contextmanager
def serve(engine: Engine, settings: ServerSettings | None = None) -> Iterator[RunningServer]:
    """Run the app under uvicorn in a thread for the duration of the block."""
    settings = settings or ServerSettings(model_name=MODEL)
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine, settings), log_level="warning", timeout_graceful_shutdown=2)
    server = Server(config)  # the command's own: a shutdown ends the requests in flight first
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", server, engine)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
