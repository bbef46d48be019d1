"""How the engine lays out a model's linear layers for decoding on a CPU.

torch's CPU linear layers call MKL's GEMM, which on this project's machines is a poor fit for
decoding: a matrix-vector product (batch 1) runs on one core whatever the thread count, and small
batches run well below the memory bandwidth. Two layouts fix that, for models the engine owns:

- `onednn`: every linear layer calls oneDNN's inner product (the kernel torch.compile's CPU backend
  uses), which spreads even one row over all threads. With two or more threads it is the fastest
  at every batch size we measured (docs/BENCHMARKS.md). Each attention's q, k and v, and each
  SwiGLU's gate and up, then run as one product (`fuse_projections`).
- `transposed`: each weight stored transposed in memory, where MKL's matrix-vector product streams
  it faster. Used with one thread, where oneDNN's one-row product is slower, and where oneDNN is
  missing from the torch build.

Neither changes a parameter's values or shape, nor the state dict; outputs agree with the plain
model to rounding. A model being trained keeps its usual layout. The fused projections serve GPU
decoding too (`fuse_projections(model, FusedLinear)`): there each product is one kernel whose
cost at a few rows is mostly latency, so three products or two cost about what one does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reasoning_llama.model import Attention, SwiGLU

__all__ = [
    "FusedLinear",
    "OneDNNLinear",
    "fuse_projections",
    "one_row_product",
    "onednn_linear_works",
    "prepare_for_cpu_decode",
    "prepare_for_gpu_decode",
    "replace_linears",
    "store_linear_weights_transposed",
]

CpuLayout = Literal["onednn", "transposed"]


def store_linear_weights_transposed(model: nn.Module) -> None:
    """Keep every linear weight's values and shape but store it transposed (column-major) in memory.

    MKL's fp32 matrix-vector product streams an (in, out) row-major matrix much faster than the
    usual (out, in) one (the 50,263-way head of small-100m: 9.2 -> 5.5 ms), bit-identical results.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()


def _onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    # torch registers this oneDNN op under a private name and has no public one.
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")  # noqa: SLF001


# torch.compile lowers the private op above only for weights it has frozen into constants; as an
# opaque op of our own it stays one call in the compiled step, the small ops around it fused.
@torch.library.custom_op("reasoning_llama::onednn_linear", mutates_args=())
def onednn_linear_op(x: Tensor, weight: Tensor) -> Tensor:
    return _onednn_linear(x, weight)


@onednn_linear_op.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@functools.cache
def onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's linear kernel and it computes what F.linear does."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x, weight = torch.randn(3, 2, 40, generator=generator), torch.randn(24, 40, generator=generator)
        with torch.inference_mode():
            return torch.allclose(_onednn_linear(x, weight), F.linear(x, weight), atol=1e-4)
    except (AttributeError, NotImplementedError, RuntimeError):  # op missing or unsupported here
        return False


def one_row_product(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)` for a one-row `x`, written as a product and a sum.

    Under torch.compile the sum is a reduction of inductor's own, which it fuses with the small
    ops around it instead of calling a library's matrix-vector kernel."""
    return (weight * x.unsqueeze(-2)).sum(-1)


def _weight_of(module: nn.Module, weight: Tensor) -> None:
    """A Parameter stays one (the model's own); a fused weight is a buffer, which an exported step
    names and the state dict leaves out."""
    if isinstance(weight, nn.Parameter):
        module.weight = weight
    else:
        module.register_buffer("weight", weight, persistent=False)


class OneDNNLinear(nn.Module):
    """A bias-free linear layer computed by oneDNN (a one-row input under torch.compile: by inductor's
    own loop); shares the weight of the layer it replaces."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        _weight_of(self, weight)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            if x.numel() == x.shape[-1]:
                # One row (batch-1 decoding): inductor compiles the product and sum into a loop
                # that streams the weight near the memory bandwidth inside the step's one kernel,
                # faster than oneDNN's one-row product (docs/BENCHMARKS.md).
                return one_row_product(x, self.weight)
            return onednn_linear_op(x, self.weight)
        return _onednn_linear(x, self.weight)  # without the custom op's Python dispatch

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class FusedLinear(nn.Module):
    """A bias-free linear layer (`F.linear`, on any device), over a fused weight or a layer's own.

    `one_row_as_sum`: a one-row input under torch.compile becomes `one_row_product`, so that a
    GPU's batch-1 decode step has inductor's fused reductions where it had a library kernel per
    product (an experiment `benchmarks/decode.py` measures beside the default; off by default).
    """

    def __init__(self, weight: Tensor, *, one_row_as_sum: bool = False) -> None:
        super().__init__()
        _weight_of(self, weight)
        self.one_row_as_sum = one_row_as_sum

    def forward(self, x: Tensor) -> Tensor:
        if self.one_row_as_sum and torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            return one_row_product(x, self.weight)
        return F.linear(x, self.weight)


def fuse_projections(model: nn.Module, linear: Callable[[Tensor], nn.Module] = OneDNNLinear) -> None:
    """One product (`linear(fused weight)`) for each attention's q, k and v and for each SwiGLU's
    gate and up.

    A decode step then reads 4 matrices a layer instead of 7; larger products stream their weights
    closer to the memory bandwidth (docs/BENCHMARKS.md). The parts' Parameters become views of the
    fused weight, which is a plain tensor: no memory is doubled and the state dict keeps its keys.
    In-place updates of the parts (`load_state_dict`, an optimizer step) reach it; converting the
    model (`.to(dtype)`), assigning new Parameters or deep-copying it afterwards would not, so fuse
    a model last, once its weights and dtype are final, as `Engine.from_checkpoint` does.
    """
    for module in list(model.modules()):
        if isinstance(module, Attention):
            name, parts = "qkv_proj", [module.q_proj, module.k_proj, module.v_proj]
        elif isinstance(module, SwiGLU):
            name, parts = "gate_up_proj", [module.gate_proj, module.up_proj]
        else:
            continue
        fused = torch.cat([part.weight.detach() for part in parts])
        start = 0
        for part in parts:
            part.weight.data = fused[start : start + part.weight.shape[0]]
            start += part.weight.shape[0]
        setattr(module, name, linear(fused))


def replace_linears(model: nn.Module, linear: Callable[[Tensor], nn.Module]) -> None:
    """Every bias-free `nn.Linear` of `model` becomes `linear(its weight)` (the same Parameter)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, linear(child.weight))


def prepare_for_gpu_decode(model: nn.Module, *, one_row_as_sum: bool = False) -> None:
    """Give a GPU model its decoding layout: q/k/v and gate/up as one product each (`FusedLinear`);
    with `one_row_as_sum`, every linear layer a `FusedLinear` that writes a one-row product as a sum."""
    if one_row_as_sum:
        as_sum = functools.partial(FusedLinear, one_row_as_sum=True)
        replace_linears(model, as_sum)
        fuse_projections(model, as_sum)
    else:
        fuse_projections(model, FusedLinear)


def prepare_for_cpu_decode(model: nn.Module) -> CpuLayout:
    """Give a CPU model the faster decoding layout for torch's current thread count; return its name."""
    if torch.get_num_threads() > 1 and onednn_linear_works():
        replace_linears(model, OneDNNLinear)
        fuse_projections(model)
        return "onednn"
    store_linear_weights_transposed(model)
    return "transposed"
