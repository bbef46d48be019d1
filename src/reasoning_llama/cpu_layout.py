"""Weight layouts that make decoding on a CPU faster, for models the inference engine owns.

Neither changes a parameter's values or shape, nor the state dict; outputs agree with the plain
model to rounding. A model being trained keeps its usual layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ColumnBlockLinear", "prepare_for_cpu_decode", "store_linear_weights_transposed"]


def store_linear_weights_transposed(model: nn.Module) -> None:
    """Keep every linear weight's values and shape but store it transposed (column-major) in memory.

    MKL's fp32 matrix-vector product streams an (in, out) row-major matrix much faster than the
    usual (out, in) one (the 50,263-way head of small-100m: 8.9 -> 5.4 ms per token), with
    bit-identical results.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, ColumnBlockLinear)):
                module.weight.data = module.weight.data.t().contiguous().t()


class ColumnBlockLinear(nn.Module):
    """A bias-free linear layer whose products for a few rows run as one bmm over column blocks.

    MKL computes a matrix-vector product on one core however many threads torch has. Cut into one
    block of output columns per thread (views of the same weight, no copy), a `bmm` spreads it over
    all of them: the small-100m head at batch 1 on a 2-core CPU goes from 5.7 to 3.6 ms. Shares its
    `weight` Parameter with the layer it replaces, so the state dict is unchanged. Expects the weight
    stored transposed (`store_linear_weights_transposed`), where each block is a strided (in, out)
    matrix the bmm reads in place.
    """

    def __init__(self, weight: nn.Parameter, max_rows: int = 16) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows  # beyond this MKL's own matrix product parallelises well

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        blocks = torch.get_num_threads()
        if blocks == 1 or rows.shape[0] > self.max_rows or x.device.type != "cpu":
            return F.linear(x, self.weight)
        transposed = self.weight.t()  # (in, out)
        even = self.out_features - self.out_features % blocks
        split = transposed[:, :even].unflatten(1, (blocks, -1)).transpose(0, 1)  # (blocks, in, out/blocks)
        out = torch.bmm(rows.expand(blocks, -1, -1), split).transpose(0, 1).reshape(rows.shape[0], even)
        if even < self.out_features:
            out = torch.cat([out, rows @ transposed[:, even:]], dim=1)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, max_rows={self.max_rows}"


def prepare_for_cpu_decode(model: nn.Module) -> None:
    """Transpose every linear weight's storage and spread the vocabulary head over torch's threads.

    Only the head is split: it is two thirds of the bytes a small-100m decode step reads, and for the
    layers' 768-wide matrices the split costs about what it saves (measured).
    """
    store_linear_weights_transposed(model)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.bias is None:
        model.head = ColumnBlockLinear(head.weight)
