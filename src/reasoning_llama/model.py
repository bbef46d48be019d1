"""The Reasoning-LLaMA transformer (DESIGN.md §2), in one file.

embedding -> N x [x + attn(norm(x)), x + mlp(norm(x))] -> norm -> final SwiGLU block -> head

Attention is grouped-query with rotate-half RoPE (the transformers convention, so weights
move to `LlamaForCausalLM` by renaming alone). One forward serves training (plain causal,
padded or packed rows) and inference (a preallocated KV cache written at given positions).
Packed rows attend inside each example through a dense boolean mask with SDPA (CPU, where
FlexAttention has no backward pass), a FlexAttention block mask (GPU: a fused kernel that skips
the blocks an example cannot see, built once per batch by `document_block_mask`), or flash
attention's variable-length form (GPU: every example a sequence of its own, `document_segments`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.overrides import TorchFunctionMode

from reasoning_llama.config import ModelConfig


def varlen_call_form(fn: Callable | None) -> tuple[dict[str, Any], bool]:
    """How `fn` (a release's `varlen_attn`) is asked for causal attention, and whether it takes fewer
    key than query heads: releases have had `is_causal`, then a window ((-1, 0) is causal), then
    also `enable_gqa`."""
    parameters = inspect.signature(fn).parameters if fn is not None else {}
    causal: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    grouped = "enable_gqa" in parameters
    return ({**causal, "enable_gqa": True} if grouped else causal), grouped


# Flash attention over variable-length sequences (CUDA only, in recent PyTorch releases), imported by
# `varlen_attention_available` on first use: the import loads torch's compiler, about a second that
# every command would otherwise pay at start.
varlen_attn: Callable | None = None
VARLEN_CAUSAL, VARLEN_TAKES_GQA = varlen_call_form(None)


def varlen_attention_available() -> bool:
    """Whether this PyTorch has `torch.nn.attention.varlen`; imports it on the first call."""
    global varlen_attn, VARLEN_CAUSAL, VARLEN_TAKES_GQA
    if varlen_attn is None:
        try:
            from torch.nn.attention.varlen import varlen_attn as kernel
        except ImportError:
            return False
        VARLEN_CAUSAL, VARLEN_TAKES_GQA = varlen_call_form(kernel)
        varlen_attn = kernel
    return True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, as transformers does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))"""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # both in one product, for decoding (cpu_layout.py)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of shape (max_len, head_dim), halves repeated (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by per-token angles cos/sin (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Grouped-query attention of one query per row (decoding), written out: q (B, H, 1, D),
    k/v (B, H_kv, T, D), mask (B, 1, 1, T) bool; what SDPA computes, (B, H, 1, D)."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    q = q.view(batch, kv_heads, heads // kv_heads, 1, dim)
    scores = (q * k.unsqueeze(2)).sum(-1) / math.sqrt(dim)  # (B, H_kv, group, T)
    scores = scores.masked_fill(~mask.view(batch, 1, 1, -1), float("-inf"))
    out = (torch.softmax(scores, dim=-1).unsqueeze(-1) * v.unsqueeze(2)).sum(-2)
    return out.reshape(batch, heads, 1, dim)


class KVCache:
    """Preallocated keys and values, one (batch, KV heads, max_len, head_dim) tensor per layer.

    Row b of the cache belongs to one sequence; token at position p lives in slot p. One tensor per
    layer (not one for all) lets torch.compile write a step's keys into the cache in place: a
    write into a slice of one larger input would be compiled as a copy of the whole of it.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.max_seq_len
        shape = (batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.views: dict[int, KVCache] = {}  # leading_rows(rows) by rows, each made once

    @classmethod
    def over(cls, keys: list[Tensor], values: list[Tensor]) -> KVCache:
        """A cache made of existing per-layer tensors (an exported decode step receives them as inputs)."""
        cache = cls.__new__(cls)
        cache.max_len = keys[0].shape[2]
        cache.keys, cache.values = list(keys), list(values)
        cache.views = {}
        return cache

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def leading_rows(self, rows: int) -> KVCache:
        """A view of the first `rows` rows (same memory), made once per row count: attention then
        slices the cache instead of gathering."""
        if rows == self.batch_size:
            return self
        if rows not in self.views:
            # Made outside inference mode whatever the caller's, so writes through the view are
            # allowed in either mode later.
            with torch.inference_mode(False):
                view = KVCache.over([k[:rows] for k in self.keys], [v[:rows] for v in self.values])
            self.views[rows] = view
        return self.views[rows]

    def update(
        self, layer: int, positions: Tensor, k: Tensor, v: Tensor, rows: Tensor | None, length: int
    ) -> tuple[Tensor, Tensor]:
        """Write k/v (B, H_kv, T, D) at `positions` (B, T); return the first `length` slots of the rows."""
        k_cache, v_cache = self.keys[layer], self.values[layer]
        row_index = (torch.arange(k.shape[0], device=k.device) if rows is None else rows).unsqueeze(1)
        # Advanced indices around a slice put their dims first: (B, T, H_kv, D).
        k_cache[row_index, :, positions] = k.transpose(1, 2).to(k_cache.dtype)
        v_cache[row_index, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        if rows is None and k.shape[0] == self.batch_size:
            return k_cache[:, :, :length], v_cache[:, :, :length]
        return k_cache[row_index.squeeze(1), :, :length], v_cache[row_index.squeeze(1), :, :length]


@dataclass(frozen=True)
class Segments:
    """Packed rows as flash attention's variable-length input: the B x T tokens taken row after row
    and cut into one sequence per example (or run of padding) of a row."""

    offsets: Tensor  # (capacity + 1,) int32: where each sequence starts, then B*T; spare ones are empty
    longest: int  # no sequence is longer (the row length)


def varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments) -> Tensor:
    """Causal attention inside each sequence of `segments`: q (B*T, H, D), k and v (B*T, H_kv, D)."""
    if varlen_attn is None and not varlen_attention_available():
        raise RuntimeError("this PyTorch has no torch.nn.attention.varlen (variable-length flash attention)")
    offsets, longest = segments.offsets, segments.longest
    if not VARLEN_TAKES_GQA:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, offsets, offsets, longest, longest, **VARLEN_CAUSAL)


@dataclass
class AttentionInputs:
    """What every layer needs besides the hidden states, built once per forward."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None  # bool (B, 1, T_q, T_k), True = may attend; None = plain causal
    positions: Tensor
    block_mask: BlockMask | None = None  # FlexAttention's sparse form of the mask, used instead of it
    segments: Segments | None = None  # or the examples as flash attention's variable-length sequences
    kv_cache: KVCache | None = None
    cache_rows: Tensor | None = None
    cache_length: int = 0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        # Read only with a KV cache, so a compiled training step never specialises on it and one
        # compiled graph serves every layer.
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v in one product, for decoding (cpu_layout.py)

    def forward(self, x: Tensor, inputs: AttentionInputs) -> Tensor:
        batch, length, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_size = self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, inputs.cos, inputs.sin).to(v.dtype)
        k = apply_rope(k, inputs.cos, inputs.sin).to(v.dtype)
        if inputs.kv_cache is not None:
            k, v = inputs.kv_cache.update(
                self.layer_index, inputs.positions, k, v, inputs.cache_rows, inputs.cache_length
            )
            k, v = k.to(q.dtype), v.to(q.dtype)
        if inputs.segments is not None:
            rows = (t.transpose(1, 2).reshape(batch * length, t.shape[1], self.head_dim) for t in (q, k, v))
            out = varlen_causal_attention(*rows, inputs.segments)
            return self.o_proj(out.reshape(batch, length, -1))
        if inputs.block_mask is not None:
            # Inside a compiled layer dynamo compiles flex_attention itself; outside one it must be
            # compiled too, as uncompiled it runs a slow reference path.
            attend = (
                flex_attention
                if torch.compiler.is_compiling()
                else compiled_once(flex_attention, dynamic=False)
            )
            out = attend(q, k, v, block_mask=inputs.block_mask, enable_gqa=True)
        elif length == 1 and inputs.kv_cache is not None and q.is_cpu and torch.compiler.is_compiling():
            # A compiled CPU decode step: written out, attention joins the step's one fused kernel
            # instead of calling SDPA's once per layer.
            out = one_query_attention(q, k, v, inputs.mask)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=inputs.mask, is_causal=inputs.mask is None, enable_gqa=True
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.ffn_dim)

    def forward(self, x: Tensor, inputs: AttentionInputs) -> Tensor:
        x = x + self.attn(self.attn_norm(x), inputs)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.final_block = SwiGLU(config.dim, config.ffn_dim) if config.final_block else None
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) everywhere; residual projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("attn.o_proj", "mlp.down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, ids: Tensor, positions: Tensor | None = None, **options: Any) -> Tensor:
        """Logits for `ids` (B, T): the head applied to `hidden_states` (same arguments)."""
        return self.head(self.hidden_states(ids, positions, **options))

    def hidden_states(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        doc_ids: Tensor | None = None,
        block_mask: BlockMask | None = None,
        segments: Segments | None = None,
        kv_cache: KVCache | None = None,
        cache_rows: Tensor | None = None,
        cache_length: int | None = None,
        select: Tensor | None = None,
    ) -> Tensor:
        """The head's input (B, T, dim): the final norm's output, after the final block if any.

        positions: RoPE positions (B, T); derived from the mask or doc ids when omitted.
        attention_mask: (B, T) bool, False at padding (left or right).
        doc_ids: (B, T) ints, one per packed example: attention stays inside an example
            and positions restart at each one.
        block_mask: `document_block_mask(doc_ids)`: the same restriction through FlexAttention.
        segments: `document_segments(doc_ids, ...)`: the same through flash attention (CUDA).
        kv_cache / cache_rows: write this step's keys and values at `positions` in the
            cache rows `cache_rows` (default: rows 0..B-1) and attend to every earlier slot;
            cache_length (the largest position + 1) spares a device-to-host read when given.
        select: (B, T) bool; when given, return only those positions, shape (N, dim),
            which skips most of the head's cost in training and prefill.
        """
        inputs = self._attention_inputs(
            ids, positions, attention_mask, doc_ids, block_mask, segments, kv_cache, cache_rows, cache_length
        )
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, inputs)
        if select is not None:
            x = x[select]
        x = self.norm(x)
        if self.final_block is not None:
            x = self.final_block(x)
        return x

    def _attention_inputs(
        self,
        ids: Tensor,
        positions: Tensor | None,
        attention_mask: Tensor | None,
        doc_ids: Tensor | None,
        block_mask: BlockMask | None,
        segments: Segments | None,
        kv_cache: KVCache | None,
        cache_rows: Tensor | None,
        cache_length: int | None,
    ) -> AttentionInputs:
        batch, length = ids.shape
        device = ids.device
        if positions is None:
            if kv_cache is not None:
                raise ValueError("decoding with a KV cache needs explicit positions")
            self._check_context(length)
            positions = default_positions(batch, length, device, attention_mask, doc_ids)
        cos = self.rope_cos[positions].unsqueeze(1)
        sin = self.rope_sin[positions].unsqueeze(1)
        if kv_cache is not None:
            if cache_length is None:
                cache_length = int(positions.max()) + 1  # a host sync; callers that know it pass it
            self._check_context(cache_length)
            key_slots = torch.arange(cache_length, device=device)
            mask = (key_slots.view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)
            return AttentionInputs(
                cos, sin, mask, positions, kv_cache=kv_cache, cache_rows=cache_rows, cache_length=cache_length
            )
        if block_mask is not None or segments is not None:
            return AttentionInputs(cos, sin, None, positions, block_mask=block_mask, segments=segments)
        if attention_mask is None and doc_ids is None:
            return AttentionInputs(cos, sin, None, positions)
        idx = torch.arange(length, device=device)
        mask = (idx.view(1, -1) <= idx.view(-1, 1)).expand(batch, length, length)
        if attention_mask is not None:
            mask = mask & attention_mask.bool().unsqueeze(1)
        if doc_ids is not None:
            mask = mask & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))
        # Every query may see itself, so rows of padding never softmax over nothing.
        mask = mask | torch.eye(length, dtype=torch.bool, device=device)
        return AttentionInputs(cos, sin, mask.unsqueeze(1), positions)

    def _check_context(self, length: int) -> None:
        if length > self.config.max_seq_len:
            raise ValueError(
                f"position {length - 1} is beyond the model's context of {self.config.max_seq_len}"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameter counts by part, in the order DESIGN.md §2 lists them."""
        parts = {"embedding": self.embed, "layers": self.layers, "final_norm": self.norm}
        if self.final_block is not None:
            parts["final_block"] = self.final_block
        parts["head"] = self.head
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
        counts["per_layer"] = counts["layers"] // max(1, self.config.n_layers)
        counts["total"] = self.num_parameters()
        return counts


class _NoInit(TorchFunctionMode):
    """Leaves `torch.nn.init`'s fills undone (modules call them from their constructors)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def uninitialised_transformer(config: ModelConfig) -> Transformer:
    """The model with its weights allocated but never written, for a caller that assigns every one
    (`load_state_dict(state, assign=True)`): no init time, and no memory until a page is written.
    The meta device would skip the init too, but its ops load torch's compiler (a second)."""
    with _NoInit():
        return Transformer(config)


def default_positions(
    batch: int,
    length: int,
    device: torch.device,
    attention_mask: Tensor | None = None,
    doc_ids: Tensor | None = None,
) -> Tensor:
    """RoPE positions: count real tokens under a padding mask, restart at each packed example."""
    idx = torch.arange(length, device=device).expand(batch, length)
    if doc_ids is not None:
        segment_start = torch.where(example_starts(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
        return idx - segment_start
    if attention_mask is not None:
        return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return idx


def example_starts(doc_ids: Tensor) -> Tensor:
    """(B, T) bool: True where a packed example (or a run of padding) begins, the row's start included."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_segments(doc_ids: Tensor, per_row: int) -> Segments:
    """`Segments` of packed rows with room for `per_row` sequences a row (`BatchLoader.segments_per_row`).

    Built on the device without reading anything back, into the same shape every batch, so a
    compiled layer never recompiles; a row with more sequences than `per_row` would be merged.
    """
    batch, length = doc_ids.shape
    total = batch * length
    starts = torch.nonzero_static(example_starts(doc_ids).flatten(), size=batch * per_row, fill_value=total)
    offsets = torch.cat([starts.flatten(), starts.new_full((1,), total)]).to(torch.int32)
    return Segments(offsets, length)


def document_block_mask(doc_ids: Tensor, block_size: int = 128, *, compiled: bool | None = None) -> BlockMask:
    """FlexAttention's mask for packed rows: causal, and inside one example (doc id) of the row.

    Padding has a doc id of its own, so it attends to itself and nothing else, as in the dense mask.
    compiled: build it through torch.compile (default on CUDA): built eagerly, the (B, T, T) mask
    it is reduced from costs ~8 ms a batch on an H200 at B 16 x T 1280, more than a layer's step.
    """
    batch, length = doc_ids.shape

    def same_document_causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (k <= q) & (doc_ids[b, q] == doc_ids[b, k])

    build = (
        compiled_once(create_block_mask)
        if (doc_ids.is_cuda if compiled is None else compiled)
        else create_block_mask
    )
    return build(
        same_document_causal, batch, None, length, length, device=doc_ids.device, BLOCK_SIZE=block_size
    )


@functools.cache
def compiled_once(fn: Callable, **options: object) -> Callable:
    """`torch.compile(fn, **options)`, made once per process, so every caller shares its graphs."""
    return torch.compile(fn, **options)
