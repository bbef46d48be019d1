"""Shared fixtures. Nothing here touches the network: the GPT-2 ranks come from the
project cache that `make setup` fills from the package registry."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from reasoning_llama.config import ModelConfig
from reasoning_llama.tokenizer import gpt2_ranks

TIKTOKEN_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture(scope="session")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own `gpt2` encoding, its download served from a pre-seeded tiktoken cache."""
    import tiktoken

    gpt2_ranks.gpt2_encoding()  # makes sure the verified files are in the project cache
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in TIKTOKEN_URLS.items():
        shutil.copy(gpt2_ranks.cache_dir() / name, cache / hashlib.sha1(url.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        encoding = tiktoken.get_encoding("gpt2")
    return encoding


@pytest.fixture
def tiny_config() -> ModelConfig:
    """A model small enough for millisecond tests, with the real vocabulary."""
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=128)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_threads():
    """`torch.set_num_threads` for one test; the thread count is put back afterwards, pass or fail."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread(torch_threads):
    """Tiny shapes run fastest on one thread (and on a shared CPU two threads wait on each other)."""
    torch_threads(1)


@pytest.fixture(scope="session")
def trained_quickstart(tmp_path_factory) -> Path:
    """The quickstart recipe trained for 200 steps on its tasks (~25 s on two threads): peaked logits
    and answers in the right format, for the tests that need a model with some skill (int8, GGUF).
    Returns its best checkpoint; the run directory is its parent."""
    from reasoning_llama.config import load_run_config
    from reasoning_llama.training.loop import Trainer

    out = tmp_path_factory.mktemp("quickstart-trained")
    config = load_run_config(
        "quickstart",
        [
            "train.max_steps=200",
            "train.warmup_steps=20",
            "train.eval_every=200",
            "train.eval_batches=1",
            "train.save_every=200",
            "train.task_eval_every=0",
            "train.task_eval_size=0",
            "train.log_every=100",
            "data.synthetic_train_size=3000",
            "data.synthetic_val_size=10",
            f"data.cache_dir={out / 'cache'}",
        ],
    )
    threads = torch.get_num_threads()  # session fixtures run before the per-test thread setting
    torch.set_num_threads(2)
    try:
        trainer = Trainer(config, out / "run", progress=False)
        trainer.run()
        trainer.close()
    finally:
        torch.set_num_threads(threads)
    assert (out / "run" / "best" / "model.safetensors").exists()
    return out / "run" / "best"
