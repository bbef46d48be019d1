"""Directories both ways between our checkpoints and the transformers `LlamaForCausalLM` layout.

Export writes config.json, model.safetensors, generation_config.json and HF tokenizer files
(tokenizer.json, tokenizer_config.json with a chat template, special_tokens_map.json) so that
`AutoModelForCausalLM` and `AutoTokenizer` load the directory offline. Import reads a local
safetensors Llama directory (single file or shards) into our checkpoint format.

The tokenizer files come from `hf_tokenizer.py`, the name and config maps from `names.py`.
Two differences from our renderer remain, as with every HF chat model: a special-token string
typed in a message (e.g. `<|im_end|>`) becomes that special id, and a message that starts with
a line break followed by more whitespace (or is just a line break) tokenizes differently at its
start, because HF pre-tokenizes the role's newline and the message text as one string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from reasoning_llama import atomic, model_files
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError
from reasoning_llama.interop.hf_tokenizer import (
    HF_SPECIAL_IDS,
    HF_TOKEN_NAMES,
    gpt2_files,
    write_hf_tokenizer,
    write_json,
)
from reasoning_llama.interop.names import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from reasoning_llama.model import uninitialised_transformer
from reasoning_llama.sampling import NEVER_SAMPLED
from reasoning_llama.tokenizer import EOT, N_VOCAB

GPT2_VOCAB = 50257
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# -- export ---------------------------------------------------------------------------


def export_hf(
    checkpoint_dir: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write a transformers `LlamaForCausalLM` directory (weights, configs, tokenizer) from our checkpoint."""
    # (absolute: `.` or `..` cannot be swapped in place by name)
    checkpoint_dir, out = Path(checkpoint_dir).expanduser(), Path(os.path.abspath(Path(out).expanduser()))
    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose one of: {', '.join(_DTYPES)}")
    config = model_files.load_config(checkpoint_dir)
    check_exportable(checkpoint_dir, config)
    _check_target(out, overwrite, source=checkpoint_dir)
    model = model_files.load_model(checkpoint_dir)
    state = {
        name: t.to(_DTYPES[dtype]).contiguous() for name, t in to_hf_state_dict(model.state_dict()).items()
    }
    hf_config = {**to_hf_config(config, **HF_SPECIAL_IDS), "torch_dtype": dtype}
    # The ids our engine never samples (as the GGUF file's suppress list): generate() then decodes as it does.
    generation = {**HF_SPECIAL_IDS, "do_sample": False, "suppress_tokens": list(NEVER_SAMPLED)}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", hf_config)
        write_json(tmp / "generation_config.json", generation)
        write_hf_tokenizer(tmp, config.max_seq_len)

    return atomic.write_dir(out, fill)


def check_exportable(checkpoint_dir: Path, config: ModelConfig) -> None:
    """Refuse what a plain Llama cannot hold (the final block) or our exported tokenizer cannot serve
    (another vocabulary); the HF and GGUF exports share these messages."""
    if config.final_block:
        raise CheckpointError(
            f"{checkpoint_dir} has the extra final SwiGLU block, which a plain LlamaForCausalLM cannot hold; "
            "only models trained with `final_block: false` (train --set train.model_overrides.final_block=false) "
            "can be exported"
        )
    if config.vocab_size != N_VOCAB:
        raise CheckpointError(
            f"{checkpoint_dir} has vocab_size {config.vocab_size}; the exported tokenizer is GPT-2 + "
            f"the chat ids ({N_VOCAB}), so only models with that vocabulary can be exported"
        )


# -- import ---------------------------------------------------------------------------


def import_hf(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a local safetensors `LlamaForCausalLM` directory into our checkpoint at `out`."""
    source, out = Path(source).expanduser(), Path(os.path.abspath(Path(out).expanduser()))
    hf_config = read_hf_config(source)
    files = hf_weight_files(source)
    config = from_hf_config(hf_config)
    if config.vocab_size not in (N_VOCAB, GPT2_VOCAB):
        raise CheckpointError(
            f"{source} has vocab_size {config.vocab_size}; reasoning-llama needs GPT-2's BPE with its chat ids "
            f"({N_VOCAB}) or plain GPT-2 ({GPT2_VOCAB}, the chat ids are then added as new rows)"
        )
    _check_hf_tokenizer(source, config.vocab_size)
    _check_target(out, overwrite, source=source)
    state = from_hf_state_dict(read_hf_weights(files))
    if config.vocab_size == GPT2_VOCAB:
        state = _add_chat_rows(state)
        config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": N_VOCAB})
    model = uninitialised_transformer(config)  # every parameter is assigned from `state`
    model_files.check_state_dict(model, state, what=f"weights in {source} do not match its config.json")
    model.load_state_dict(state, assign=True)
    # float32 like every checkpoint training writes (a bf16 model would train in bf16, without the
    # fp32 master weights autocast keeps, and the int8 path expects fp32)
    return model_files.save_model(out, model.float())


def read_hf_config(source: Path) -> dict[str, Any]:
    """config.json of a transformers Llama directory, with clear errors for anything else."""
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a directory; give a local transformers model directory")
    path = source / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{source} has no config.json; is it a transformers model directory?")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict) or "hidden_size" not in hf or "model_type" not in hf:
        raise CheckpointError(
            f"{path} is not a transformers config (no model_type/hidden_size); "
            "a reasoning-llama checkpoint needs no import"
        )
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        raise CheckpointError(
            f"{source} holds {', '.join(architectures)}; only LlamaForCausalLM can be imported"
        )
    return hf


def hf_weight_files(source: Path) -> Mapping[Path, set[str] | None]:
    """model.safetensors, or each shard of model.safetensors.index.json with the names it must hold."""
    single, index = source / "model.safetensors", source / "model.safetensors.index.json"
    if single.is_file():
        return {single: None}
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
        shards: dict[Path, set[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(source / shard, set()).add(name)
        absent = sorted(path.name for path in shards if not path.is_file())
        if absent:
            raise CheckpointError(f"{source} lacks shards listed in {index.name}: {', '.join(absent[:3])}")
        return shards
    pickles = sorted(p.name for p in source.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{source} holds only pickled weights ({', '.join(pickles)}); reasoning-llama never unpickles "
            "files. Convert them to safetensors in an environment you trust, e.g. "
            "LlamaForCausalLM.from_pretrained(SRC).save_pretrained(NEW, safe_serialization=True)"
        )
    raise CheckpointError(f"{source} has no model.safetensors or model.safetensors.index.json")


def read_hf_weights(files: Mapping[Path, set[str] | None]) -> dict[str, Tensor]:
    """Every tensor of the files `hf_weight_files` found, checking each shard holds what its index says."""
    state: dict[str, Tensor] = {}
    for path, expected in files.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if expected is not None and not expected <= names:
                    missing = sorted(expected - names)[:3]
                    raise CheckpointError(f"{path} lacks {', '.join(missing)}, listed in the shard index")
                state.update({name: f.get_tensor(name) for name in names})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return state


def _check_hf_tokenizer(source: Path, vocab_size: int) -> None:
    """When SRC ships a tokenizer.json, make sure its ids mean what ours mean."""
    path = source / "tokenizer.json"
    if not path.is_file():
        return
    try:
        spec = json.loads(path.read_text())
        vocab: dict[str, int] = dict(spec["model"]["vocab"])
        added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path} is not a tokenizers byte-level BPE tokenizer.json") from None
    encoder, _ = gpt2_files()
    gpt2 = json.loads(encoder.read_text())
    base = {token: i for token, i in vocab.items() if i < GPT2_VOCAB}
    if base != gpt2:
        raise CheckpointError(f"{path} is not GPT-2's BPE vocabulary; reasoning-llama cannot use this model")
    if vocab_size == N_VOCAB:
        chat = {i: added.get(i, next((t for t, j in vocab.items() if j == i), None)) for i in HF_TOKEN_NAMES}
        wrong = [f"{i}={chat[i]!r}" for i, name in HF_TOKEN_NAMES.items() if chat[i] != name and i != EOT]
        if wrong:
            raise CheckpointError(
                f"{path} gives ids 50257..50262 other meanings ({', '.join(wrong)}) than reasoning-llama's chat ids"
            )


def _add_chat_rows(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Grow a GPT-2-vocabulary model by the six chat ids, each row the mean of the existing rows."""
    out = dict(state)
    for name in ("embed.weight", "head.weight"):
        if name in out:
            rows = out[name]
            extra = rows.float().mean(0, keepdim=True).to(rows.dtype).expand(N_VOCAB - rows.shape[0], -1)
            out[name] = torch.cat([rows, extra])
    return out


# -- shared ---------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool, *, source: Path) -> None:
    """Refuse to clobber the source, a training checkpoint, or a directory that is not a model directory."""
    from reasoning_llama.training import run_checkpoints as ckpt

    if out.resolve() == source.resolve():
        raise CheckpointError(f"the output {out} is the input directory; choose another")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "config.json").is_file():  # checked first: --overwrite would not help
            raise CheckpointError(
                f"{out} exists and does not look like a model directory (no config.json); choose another output"
            )
        run_files = (ckpt.TRAINER_STATE, ckpt.DISTRIBUTED, ckpt.CHECKPOINTS, ckpt.BEST_INFO)
        training = [n for n in run_files if (out / n).exists()]
        if training:  # a run's checkpoint or best model: replacing it would lose part of the run
            raise CheckpointError(
                f"{out} is a training run's checkpoint (it holds {training[0]}); replacing it would lose "
                "part of the run; choose another output"
            )
        if not overwrite:
            raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
