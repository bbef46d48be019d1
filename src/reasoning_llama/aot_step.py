"""The CPU decode step compiled ahead of time: torch.export, then AOTInductor.

torch.compile makes a CPU decode step of `small-100m` one C++ kernel, but every call still passes
through dynamo (frame evaluation, guards) and inductor's Python wrapper, close to a millisecond
a token beside a kernel of ~8 ms. AOTInductor compiles the same graph, its wrapper included, into
a shared library that the step calls directly (docs/BENCHMARKS.md has the side-by-side figures).

Two programs, both exported and compiled (or loaded) when the step is built: one row (batch-1
decoding, where `cpu_layout.OneDNNLinear` becomes a loop inside the one kernel) and, for a cache of
several rows, two or more rows. The context length is a dynamic size: export turns sizes, not
ints, into symbols, so it comes in as the length of an empty tensor. The weights stay the model's own tensors
(`load_constants(..., user_managed=True)`), so a compiled package holds code only; it is kept in
the user cache under a hash of what that code depends on, and a later process loads it instead of
compiling again.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch._inductor import aoti_compile_and_package, aoti_load_package
from torch._inductor.package import AOTICompiledModel

from reasoning_llama import atomic
from reasoning_llama.decoding import active_rows, decode
from reasoning_llama.errors import ConfigError
from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.user_cache import user_cache_dir

__all__ = ["AOTDecodeStep", "compiled_program", "package_key"]

# Export treats sizes 0 and 1 as constants, so the context length it sees is never below 2.
_MIN_LENGTH = 2


class _DecodeModule(nn.Module):
    """`decode` with tensor inputs only, as torch.export takes it: the cache as its per-layer
    tensors, the context length as `span`'s length."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: Tensor, positions: Tensor, keys: list[Tensor], values: list[Tensor], span: Tensor
    ) -> Tensor:
        return decode(self.model, KVCache.over(keys, values), tokens, positions, cache_length=span.shape[0])


def package_key(program: torch.export.ExportedProgram) -> str:
    """What a compiled package depends on, hashed: this torch, this CPU's instruction set, this many
    threads (the kernels are built for them) and the printed graph, every shape in it, less its
    comments (they name source files, which move with the checkout)."""
    depends_on = [torch.__version__, torch.backends.cpu.get_cpu_capability(), str(torch.get_num_threads())]
    graph = [line for line in str(program).splitlines() if not line.lstrip().startswith("#")]
    return hashlib.sha256("\n".join([*depends_on, *graph]).encode()).hexdigest()[:32]


def compiled_program(
    module: nn.Module, args: tuple, dynamic_shapes: tuple, cache_dir: Path | None = None
) -> AOTICompiledModel:
    """Export `module` on `args`, compile it with AOTInductor (or load the package compiled
    before from `cache_dir`, default the user cache) and bind it to the module's own weights."""
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes)
    path = (cache_dir or user_cache_dir("decode-steps")) / f"{package_key(program)}.pt2"
    if not path.exists():
        options = {"aot_inductor.package_constants_in_so": False}  # code only: the weights are bound below
        try:
            with warnings.catch_warnings():
                # torch's own deprecation, raised from inside its compiler (torch 2.13): nothing to act on.
                warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)`", FutureWarning)
                atomic.write_path(
                    path,
                    lambda tmp: aoti_compile_and_package(
                        program, package_path=str(tmp), inductor_configs=options
                    ),
                )
        except Exception as error:  # a missing or broken C++ compiler, mostly; the cause stays chained
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"compiling the decode step failed ({reason}); it needs a C++ compiler (g++ or clang++, "
                "or the one $CXX names): install one, or run without --compile"
            ) from error
    runner = aoti_load_package(path)
    tensors = {**program.state_dict, **program.constants}
    runner.load_constants(
        {name: tensors[name] for name in runner.get_constant_fqns()},
        check_full_update=True,
        user_managed=True,
    )
    return runner


class AOTDecodeStep:
    """The decode step on a CPU, as AOTInductor's compiled programs: rows 0..rows-1, shapes
    following the rows in use and the context so far, like `DynamicDecodeStep`.

    Both programs are compiled (or loaded) here, so a server has them before its first request and
    a machine without a C++ compiler says so at startup."""

    def __init__(self, model: Transformer, cache: KVCache, *, cache_dir: Path | None = None) -> None:
        if cache.device.type != "cpu":
            raise ValueError(f"the ahead-of-time step runs on a CPU, not on {cache.device}")
        self.cache = cache
        # One row or several -> its compiled program.
        self.programs = {
            several: self._compile(model, several, cache_dir) for several in {False, cache.batch_size > 1}
        }

    def _compile(self, model: Transformer, several: bool, cache_dir: Path | None) -> AOTICompiledModel:
        rows = 2 if several else 1
        example = self.cache.leading_rows(rows)
        args = (
            torch.zeros(rows, dtype=torch.long),
            torch.ones(rows, dtype=torch.long),
            example.keys,
            example.values,
            torch.empty(_MIN_LENGTH + 1, 0),
        )
        batch = torch.export.Dim.DYNAMIC if several else torch.export.Dim.STATIC
        layers = len(example.keys)
        shapes = (
            {0: batch},
            {0: batch},
            [{0: batch}] * layers,
            [{0: batch}] * layers,
            {0: torch.export.Dim.DYNAMIC},
        )
        return compiled_program(_DecodeModule(model), args, shapes, cache_dir)

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int]) -> Tensor:
        rows = len(tokens)
        view = self.cache.leading_rows(rows)
        length = max(max(positions) + 1, _MIN_LENGTH)  # a longer context is masked past each position
        logits = self.programs[rows > 1](
            torch.tensor(tokens), torch.tensor(positions), view.keys, view.values, torch.empty(length, 0)
        )
        # The program computes every row's logits; at a CPU's batch sizes the head's weight read
        # dominates, so the idle rows cost little.
        return active_rows(logits, active)
