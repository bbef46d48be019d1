"""int8 weights for decoding on a CPU, and what they cost in accuracy.

Decoding one token reads every weight once, so at batch 1 its speed is the memory bandwidth over
the weight bytes; int8 weights read a quarter of fp32's. The kernel is PyTorch's own dynamic int8
linear (fbgemm, `torch.ops.quantized.linear_dynamic`): weights int8 per output channel, packed once;
activations quantized to 8 bits with one scale per call (7 bits where the kernel's pair sums would
saturate, see `full_activation_range`), the product accumulated in int32 and rescaled to fp32.

Measured before choosing (docs/BENCHMARKS.md): torchao's int8 configurations run this model's layers
in eager mode through `torch._int_mm` or `_weight_int8pack_mm`, 7 to 100 times slower than fbgemm on
this project's CPUs, and are meant for torch.compile's x86 path instead.

One activation scale per call means a row's rounding depends on the other rows of its batch: an
int8 engine's batched tokens can differ from the same request alone (the fp32 engine's never do).
Embedding and norms stay fp32 (decoding reads one embedding row per token).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reasoning_llama.decoding import decode, prefill
from reasoning_llama.model import KVCache, Transformer

__all__ = [
    "Agreement",
    "Int8Linear",
    "compare_decoding",
    "full_activation_range",
    "int8_linear_works",
    "quantize_int8",
]


@functools.cache
def full_activation_range() -> bool:
    """Whether fbgemm's kernel on this CPU takes 8-bit activations without saturating.

    Without VNNI, fbgemm adds u8 x s8 products in pairs into 16-bit sums, which 8-bit activations can
    overflow (255 x 127 x 2 > 32,767); PyTorch's own dynamic qconfigs therefore use 7 bits. With VNNI
    the sums are 32-bit and 8 bits halve the rounding error. Rather than guess from CPU flags, ask the
    kernel: a product whose every pair would saturate a 16-bit sum.
    """
    in_features = 256
    weight = torch.ones(16, in_features)
    x = torch.full((8, in_features), 3.0)
    x[:, 0] = -0.01  # the quantization range then maps 3.0 to 255
    try:
        with torch.inference_mode():
            packed = _pack(weight)
            for rows in (1, 8):  # fbgemm may pick its kernel by shape
                out = torch.ops.quantized.linear_dynamic(x[:rows], packed, False)
                if not torch.allclose(out, F.linear(x[:rows], weight), rtol=0.01):
                    return False
        return True
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def _pack(weight: Tensor) -> object:
    """fbgemm's packed (blocked) int8 layout of a weight: symmetric, one scale per output channel."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        # torch warns that quantized tensor types will go (pytorch#184982); fbgemm's packing still
        # takes one, and int8_linear_works() turns the engine's int8 option off once it fails.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel")
        qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, None)


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (symmetric, one scale per output channel)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)  # made once; the fp32 weight is not kept
        self.reduce_range = not full_activation_range()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

    @property
    def weight(self) -> Tensor:
        """The int8 weight times its scales, in fp32 (for code that multiplies by the weight itself,
        such as the loss's fused head: it then sees int8's weights, with unrounded activations)."""
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        return qweight.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@functools.cache
def int8_linear_works() -> bool:
    """Whether this torch build has the dynamic int8 linear kernel and it computes what F.linear does."""
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight = torch.randn(3, 64, generator=generator), torch.randn(48, 64, generator=generator)
        with torch.inference_mode():
            error = (Int8Linear(weight)(x) - F.linear(x, weight)).abs().max()
        return bool(error < 0.05 * F.linear(x, weight).abs().max())
    except (AttributeError, NotImplementedError, RuntimeError):  # op or quantized engine missing
        return False


def quantize_int8(model: nn.Module) -> int:
    """Replace every bias-free linear layer of a CPU model by an Int8Linear, in place; return how many.

    The model is for inference afterwards: the int8 layers hold no Parameters and no state dict.
    """
    if not int8_linear_works():
        raise RuntimeError("this torch build has no working dynamic int8 linear kernel (fbgemm)")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, Int8Linear(child.weight))
                replaced += 1
    return replaced


# -- what it costs ----------------------------------------------------------------------------


@dataclass
class Agreement:
    """A candidate model's decoding against a reference's, on the reference's own greedy tokens."""

    tokens: int  # decoded positions compared
    greedy_agreement: float  # fraction where both pick the same next id
    max_logit_error: float  # largest |candidate - reference| logit over every position and id
    mean_logit_error: float  # mean |candidate - reference| over every position and id
    logit_scale: float  # mean |reference logit|, to read the errors against

    def as_dict(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "greedy_agreement": round(self.greedy_agreement, 4),
            "max_logit_error": round(self.max_logit_error, 4),
            "mean_logit_error": round(self.mean_logit_error, 5),
            "mean_abs_logit": round(self.logit_scale, 4),
        }


@torch.inference_mode()
def compare_decoding(
    reference: Transformer, candidate: Transformer, prompts: Sequence[Sequence[int]], new_tokens: int
) -> Agreement:
    """Teacher-forced comparison through the decode path (batch 1, a KV cache each).

    The reference decodes `new_tokens` greedily after each prompt; the candidate is fed the same
    tokens, so one early disagreement does not make every later position differ. Each position
    compares the two argmaxes and the logits.
    """
    agree = positions = 0
    max_error = error_sum = scale_sum = 0.0
    vocab = reference.config.vocab_size
    for prompt in prompts:
        length = len(prompt) + new_tokens
        caches = [KVCache(m.config, 1, length) for m in (reference, candidate)]
        ref_logits = prefill(reference, caches[0], [prompt], [0])
        cand_logits = prefill(candidate, caches[1], [prompt], [0])
        for step in range(new_tokens):
            token = ref_logits.argmax(dim=-1)
            agree += int(cand_logits.argmax(dim=-1) == token)
            error = (cand_logits - ref_logits).abs()
            max_error = max(max_error, float(error.max()))
            error_sum += float(error.sum())
            scale_sum += float(ref_logits.abs().sum())
            positions += 1
            if step + 1 == new_tokens:
                break
            position = torch.tensor([len(prompt) + step])
            ref_logits = decode(reference, caches[0], token, position)
            cand_logits = decode(candidate, caches[1], token, position)
    values = positions * vocab
    return Agreement(
        tokens=positions,
        greedy_agreement=agree / positions if positions else math.nan,
        max_logit_error=max_error,
        mean_logit_error=error_sum / values if values else math.nan,
        logit_scale=scale_sum / values if values else math.nan,
    )
