"""One GGUF file for llama.cpp from a checkpoint (`export --to gguf`), written with gguf-py.

The file says what llama.cpp's own converter (`convert_hf_to_gguf.py`) would say about our
`export --to hf` directory, without transformers or the converter script:

- `llama` architecture metadata and tensor names (gguf-py's map of the transformers names);
- q and k rows reordered per head from rotate-half pairs (i, i + d/2), our layout and
  transformers', to adjacent pairs (2i, 2i + 1), the RoPE layout llama.cpp's `llama` graph applies;
- GPT-2's byte-level BPE (`tokenizer.ggml.model = gpt2`, `pre = gpt-2`: GPT-2's split pattern), its
  tokens and merges from the verified GPT-2 files, the chat ids as control tokens under the HF
  export's names, `<|im_end|>` as end of turn, `<|endoftext|>` as end of sequence, and the HF
  export's chat template;
- `tokenizer.ggml.suppress_tokens`: the ids our engine never samples (DESIGN.md §1: they come
  from structure only); llama.cpp's samplers (llama-cli, llama-server) bias them to -inf.

Dtypes follow the converter: norms stay f32, every matrix becomes f16 or q8_0 (a matrix whose
rows are not a whole number of q8_0 blocks falls back to f16, as there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from reasoning_llama import atomic, model_files
from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError
from reasoning_llama.interop.hf import check_exportable
from reasoning_llama.interop.hf_tokenizer import CHAT_TEMPLATE, HF_TOKEN_NAMES, gpt2_files
from reasoning_llama.interop.names import to_hf_state_dict
from reasoning_llama.sampling import NEVER_SAMPLED
from reasoning_llama.tokenizer import EOT, IM_END, N_VOCAB, PAD

if TYPE_CHECKING:
    from gguf import GGUFWriter

GGUF_DTYPES = ("f32", "f16", "q8_0")
GGUF_MAGIC = b"GGUF"
TOKENIZER_PRE = "gpt-2"  # llama.cpp's name for GPT-2's pre-tokenizer regex
SUPPRESS_TOKENS_KEY = "tokenizer.ggml.suppress_tokens"  # gguf-py 0.19 on PyPI has no constant for it


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "exporting to GGUF needs the `gguf` package: pip install 'reasoning-llama[gguf]'"
        ) from None
    return gguf


def export_gguf(
    checkpoint_dir: str | Path, out: str | Path, *, dtype: str = "f32", overwrite: bool = False
) -> Path:
    """Write our checkpoint (without the final block) as one GGUF file for llama.cpp."""
    gguf = _gguf()
    checkpoint_dir, out = Path(checkpoint_dir).expanduser(), Path(os.path.abspath(Path(out).expanduser()))
    if dtype not in GGUF_DTYPES:
        raise CheckpointError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    config = model_files.load_config(checkpoint_dir)
    check_exportable(checkpoint_dir, config)
    _check_target(out, overwrite)
    model = model_files.load_model(checkpoint_dir)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_model_metadata(writer, config, dtype, name=out.stem)
    _add_tokenizer(writer)
    for name, array, qtype in gguf_tensors(model.state_dict(), config, dtype):
        writer.add_tensor(name, array, raw_dtype=qtype)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic.write_path(out, write)


# -- metadata -------------------------------------------------------------------------


def _add_model_metadata(writer: GGUFWriter, config: ModelConfig, dtype: str, *, name: str) -> None:
    gguf = _gguf()
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: GGUFWriter) -> None:
    tokens, types, merges = gguf_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT)  # as in the HF export; never added (add_bos_token is false)
    writer.add_eos_token_id(EOT)
    writer.add_eot_token_id(IM_END)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_array(SUPPRESS_TOKENS_KEY, list(NEVER_SAMPLED))
    writer.add_chat_template(CHAT_TEMPLATE)


def gguf_vocabulary() -> tuple[list[str], list[int], list[str]]:
    """Token strings by id, their llama.cpp token types, and the BPE merges, for our 50,263 ids.

    Tokens are GPT-2's byte-level strings (as in encoder.json); the ids after GPT-2's carry the HF
    export's names, so the shared chat template renders to them.
    """
    gguf = _gguf()
    encoder_path, merges_path = gpt2_files()
    encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
    by_id = {i: token for token, i in encoder.items()}
    by_id.update(HF_TOKEN_NAMES)
    tokens = [by_id[i] for i in range(N_VOCAB)]
    types = [
        int(gguf.TokenType.CONTROL if i in HF_TOKEN_NAMES else gguf.TokenType.NORMAL) for i in range(N_VOCAB)
    ]
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    return tokens, types, merges


# -- tensors --------------------------------------------------------------------------


def rope_pairs_adjacent(weight: Tensor, n_heads: int) -> Tensor:
    """Reorder a q or k projection's output rows, per head, from rotate-half pairs to adjacent pairs.

    Row i of a head (i < d/2) rotates with row i + d/2 in our layout; llama.cpp rotates rows 2i and
    2i + 1 together. Moving row i to 2i and row i + d/2 to 2i + 1 in both q and k gives the same
    scores (a dot product over a head does not care how its dimensions are ordered).
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def gguf_tensors(
    state: dict[str, Tensor], config: ModelConfig, dtype: str
) -> list[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, GGML type) for every weight, in llama.cpp's layout and the requested dtype."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layers)
    wanted = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[dtype]
    out = []
    for hf_name, tensor in to_hf_state_dict(state).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise CheckpointError(f"no GGUF name for parameter {hf_name!r}")
        weight = tensor.detach().to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            weight = rope_pairs_adjacent(weight, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = rope_pairs_adjacent(weight, config.n_kv_heads)
        array = weight.contiguous().numpy()
        qtype = wanted if array.ndim == 2 else gguf.GGMLQuantizationType.F32
        try:
            data = gguf.quants.quantize(array, qtype)
        except gguf.QuantError:  # rows not a whole number of blocks
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, qtype)
        out.append((name, data, qtype))
    return out


# -- target ---------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a directory, or an existing file that is not a GGUF file, or any file without `overwrite`."""
    if out.is_dir():
        raise CheckpointError(
            f"{out} is a directory; the GGUF export writes one file, e.g. {out / 'model.gguf'}"
        )
    if out.exists():
        with open(out, "rb") as f:  # checked first: --overwrite would not help
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise CheckpointError(f"{out} exists and is not a GGUF file; choose another output file")
        if not overwrite:
            raise CheckpointError(f"{out} already exists; pass --overwrite to replace it")
