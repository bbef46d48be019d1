"""The user cache lives under $REASONING_LLAMA_CACHE when set, else ~/.cache/reasoning-llama."""

from pathlib import Path

from reasoning_llama.tokenizer.gpt2_ranks import cache_dir
from reasoning_llama.user_cache import user_cache_dir


def test_the_environment_variable_moves_every_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("REASONING_LLAMA_CACHE", str(tmp_path))
    assert user_cache_dir("decode-steps") == tmp_path / "decode-steps"
    assert cache_dir() == tmp_path / "gpt2"
    monkeypatch.delenv("REASONING_LLAMA_CACHE")
    assert user_cache_dir("gpt2") == Path.home() / ".cache" / "reasoning-llama" / "gpt2"
