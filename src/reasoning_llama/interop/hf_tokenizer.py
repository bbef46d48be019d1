"""The HF tokenizer files of an exported model: GPT-2's byte-level BPE with our chat ids as added
tokens, and the chat format (DESIGN.md §1) as a Jinja chat template.

The role ids get HF token strings `<|user|>`, `<|reasoning|>`, `<|assistant|>`: HF matches
added tokens anywhere in text, so the plain words of DESIGN.md §1 would hijack ordinary prose.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from reasoning_llama.errors import TokenizerError
from reasoning_llama.tokenizer import ASSISTANT, EOT, IM_END, IM_START, N_VOCAB, PAD, REASONING, USER
from reasoning_llama.tokenizer.gpt2_ranks import (
    ENCODER_JSON_SHA256,
    VOCAB_BPE_SHA256,
    cache_dir,
    fetch_from_registry,
)

HF_TOKEN_NAMES: dict[int, str] = {
    EOT: "<|endoftext|>",
    IM_START: "<|im_start|>",
    IM_END: "<|im_end|>",
    USER: "<|user|>",
    REASONING: "<|reasoning|>",
    ASSISTANT: "<|assistant|>",
    PAD: "<|PAD|>",
}
HF_SPECIAL_IDS = {"bos_token_id": EOT, "eos_token_id": [IM_END, EOT], "pad_token_id": PAD}

# DESIGN.md §1 in Jinja: system messages fold into the first user turn after a blank line,
# earlier assistant turns keep only their answer, the generation prompt opens the reasoning.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system=[], first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' and m['content'] -%}"
    "{%- set ns.system = ns.system + [m['content']] -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- set content = m['content'] -%}"
    "{%- if ns.first and ns.system -%}{%- set content = (ns.system + [content]) | join('\\n\\n') -%}{%- endif -%}"
    "{%- set ns.first = false -%}"
    "{{- '<|im_start|><|user|>\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<|im_start|><|assistant|>\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- elif m['role'] != 'system' -%}"
    "{{- raise_exception('unknown role ' + m['role'] + '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.system and ns.first -%}"
    "{{- raise_exception('a system message needs a user message to attach to') -}}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|><|reasoning|>\\n' -}}{%- endif -%}"
)


def gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's verified `encoder.json` and `vocab.bpe`, fetched once if missing."""
    encoder, merges = cache_dir() / "encoder.json", cache_dir() / "vocab.bpe"
    for path, digest in ((encoder, ENCODER_JSON_SHA256), (merges, VOCAB_BPE_SHA256)):
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            fetch_from_registry()
            break
    return encoder, merges


def build_hf_tokenizer() -> Any:
    """GPT-2's byte-level BPE as a `tokenizers.Tokenizer`, with our special ids as added tokens."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        raise TokenizerError(
            "exporting needs the `tokenizers` library: pip install 'reasoning-llama[hf]'"
        ) from None
    encoder, merges = gpt2_files()
    tokenizer = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    # GPT-2's own split pattern, equivalent to tiktoken's r50k pattern.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added in id order: <|endoftext|> keeps GPT-2's 50256, the rest get 50257.. in turn.
    specials = [AddedToken(HF_TOKEN_NAMES[i], special=True, normalized=False) for i in sorted(HF_TOKEN_NAMES)]
    tokenizer.add_special_tokens(specials)
    got = {i: tokenizer.token_to_id(name) for i, name in HF_TOKEN_NAMES.items()}
    if any(i != j for i, j in got.items()) or tokenizer.get_vocab_size() != N_VOCAB:
        raise TokenizerError(f"HF tokenizer special ids came out wrong: {got}")
    return tokenizer


def _tokenizer_config(max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": HF_TOKEN_NAMES[EOT],
        "eos_token": HF_TOKEN_NAMES[IM_END],
        "pad_token": HF_TOKEN_NAMES[PAD],
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }


def write_hf_tokenizer(directory: Path, max_len: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
    build_hf_tokenizer().save(str(directory / "tokenizer.json"))
    config = _tokenizer_config(max_len)
    write_json(directory / "tokenizer_config.json", config)
    special = {key: config[key] for key in ("bos_token", "eos_token", "pad_token")}
    special["additional_special_tokens"] = [HF_TOKEN_NAMES[i] for i in (IM_START, USER, REASONING, ASSISTANT)]
    write_json(directory / "special_tokens_map.json", special)


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
