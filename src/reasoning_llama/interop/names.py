"""State dicts and configs both ways between our model and transformers' LlamaForCausalLM.

The layouts are the same (rotate-half RoPE, separate q/k/v, untied head), so conversion
is renaming. Our extra final SwiGLU block has no Llama counterpart: a model that has one
cannot become a plain LlamaForCausalLM.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from reasoning_llama.config import ModelConfig
from reasoning_llama.errors import CheckpointError

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
_OURS_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers transformers may keep in a state dict; they are recomputed, not weights.
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def to_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our parameter names -> LlamaForCausalLM's. Refuses a model with the final block."""
    if any(name.startswith("final_block.") for name in state):
        raise CheckpointError(
            "this model has the extra final SwiGLU block, which LlamaForCausalLM lacks; "
            "train or convert with final_block=false to move it to transformers"
        )
    out = {}
    for name, tensor in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = tensor
        elif (m := _OURS_LAYER.fullmatch(name)) and m.group(2) in _LAYER_NAMES:
            out[f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"] = tensor
        else:
            raise CheckpointError(f"no transformers name for parameter {name!r}")
    return out


def from_hf_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LlamaForCausalLM's parameter names -> ours."""
    top = {hf: ours for ours, hf in _TOP_NAMES.items()}
    layer = {hf: ours for ours, hf in _LAYER_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        if _HF_IGNORED.fullmatch(name):
            continue
        if name in top:
            out[top[name]] = tensor
        elif (m := _HF_LAYER.fullmatch(name)) and m.group(2) in layer:
            out[f"layers.{m.group(1)}.{layer[m.group(2)]}"] = tensor
        else:
            raise CheckpointError(f"unexpected transformers parameter {name!r}")
    if "head.weight" not in out and "embed.weight" in out:
        out["head.weight"] = out["embed.weight"].clone()  # a tied HF model: untie by copying
    return out


def to_hf_config(config: ModelConfig, **token_ids: int) -> dict[str, Any]:
    """A LlamaConfig dict (as in config.json) for a model without the final block."""
    if config.final_block:
        raise CheckpointError("a model with the extra final SwiGLU block has no LlamaConfig")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "initializer_range": config.init_std,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        **token_ids,
    }


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a LlamaConfig dict; refuses what our model cannot express."""
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"expected a llama model, got model_type={hf.get('model_type')!r}")
    missing = [key for key in _HF_REQUIRED if key not in hf]
    if missing:
        raise CheckpointError(f"Llama config lacks {', '.join(missing)}")
    problems = []
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("biases")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        problems.append(f"activation {hf.get('hidden_act')}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads):
        problems.append(f"head_dim {hf['head_dim']} != hidden_size / heads")
    if problems:
        raise CheckpointError("unsupported Llama features: " + ", ".join(problems))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hidden,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        final_block=False,
        init_std=hf.get("initializer_range", 0.02),
    )
