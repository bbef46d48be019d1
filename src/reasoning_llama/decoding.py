"""How the engine runs the model: the two model calls, and the decode step that repeats one of them.

`prefill` writes prompts into cache rows; `decode` feeds one token per row. The engine calls
`prefill` as requests arrive and a decode step once per token, through one of:

- `DynamicDecodeStep`: `decode` on rows 0..rows-1, shapes following the batch, on any device,
  eager or compiled. The engine knows every row's position, so the step never reads one back
  from the device.
- `StaticDecodeStep`: the same forward on fixed shapes (a few padded batch sizes, the whole
  cache), compiled by torch.compile; on CUDA captured in CUDA graphs once per size and replayed.
  A GPU runs a small model's step in far less time than the CPU takes to launch its hundreds of
  kernels one by one; a replay launches them all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.tokenizer import PAD

__all__ = ["DecodeStep", "DynamicDecodeStep", "StaticDecodeStep", "decode", "padded_batch_sizes", "prefill"]

# tokens (rows,), positions (rows,), the active rows among them (ascending) -> their fp32 logits (n, V).
DecodeStep = Callable[[Sequence[int], Sequence[int], Sequence[int]], Tensor]


def prefill(
    model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]], rows: Sequence[int]
) -> Tensor:
    """Write the prompts (right-padded together) into cache rows `rows`; logits at each prompt's end (n, V)."""
    device = cache.device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    # Padding writes junk past each prompt's end; those slots are rewritten before any query sees them.
    logits = model(
        ids.to(device),
        positions,
        kv_cache=cache,
        cache_rows=torch.tensor(list(rows), device=device),
        cache_length=width,
        select=positions == last.unsqueeze(1),
    )
    return logits.float()


def decode(
    model: Transformer,
    cache: KVCache,
    tokens: Tensor,
    positions: Tensor,
    active: Tensor | None = None,
    *,
    cache_length: int | None = None,
) -> Tensor:
    """Feed one token (B,) at `positions` (B,) into cache rows 0..B-1; logits (n, V) of the rows
    `active` (indices; default: all). cache_length (the largest position + 1, or more) spares
    reading the positions back from the device."""
    rows = tokens.shape[0]
    if rows < cache.batch_size:
        cache = cache.leading_rows(rows)
    return _decode_rows(model, cache, tokens, positions, active, cache_length)


def _decode_rows(
    model: Transformer,
    cache: KVCache,
    tokens: Tensor,
    positions: Tensor,
    active: Tensor | None,
    cache_length: int | None,
) -> Tensor:
    hidden = model.hidden_states(
        tokens.unsqueeze(1), positions.unsqueeze(1), kv_cache=cache, cache_length=cache_length
    )[:, 0]
    if active is not None:
        hidden = hidden[active]  # only these rows pay for the head
    return model.head(hidden).float()


class DynamicDecodeStep:
    """`decode` on rows 0..rows-1: shapes follow the rows in use and the context so far.

    The cache length comes from the host's positions, so nothing is read back from the device.
    `compile=True` runs it through torch.compile with dynamic shapes (one compilation serves every
    batch and context length), which fuses the step's many small ops (norms, RoPE, cache writes).
    """

    def __init__(self, model: Transformer, cache: KVCache, *, compile: bool = False) -> None:
        self.model = model
        self.cache = cache
        self.forward = torch.compile(_decode_rows, dynamic=True, fullgraph=True) if compile else _decode_rows
        self.views = {cache.batch_size: cache}  # leading_rows views, made once per row count

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int]) -> Tensor:
        device = self.cache.device
        rows = len(tokens)
        if rows not in self.views:
            self.views[rows] = self.cache.leading_rows(rows)
        return self.forward(
            self.model,
            self.views[rows],
            torch.tensor(tokens, device=device),
            torch.tensor(positions, device=device),
            None if len(active) == rows else torch.tensor(active, device=device),
            max(positions) + 1,
        )


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a graph is captured for: powers of two below `max_batch_size`, then itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _static_step(model: Transformer, cache: KVCache, tokens: Tensor, positions: Tensor) -> Tensor:
    """One token per cache row, attending over every slot of the cache (masked past each position)."""
    logits = model(tokens.unsqueeze(1), positions.unsqueeze(1), kv_cache=cache, cache_length=cache.max_len)
    return logits[:, 0].float()


class StaticDecodeStep:
    """The decode step on fixed shapes: padded batch sizes, the whole cache, static buffers.

    Every tensor the step touches has a fixed address and shape: a token and a position buffer,
    the whole KV cache (attention covers every slot, masked past each row's position, so no shape
    depends on the context length) and the logits. A step pads its rows to the smallest of a few
    batch sizes that holds them (padding rows are free slots fed PAD at position 0, as idle rows
    always are, and their logits are dropped), so continuous batching only ever meets those shapes.

    That is what CUDA graphs need: with `cuda_graphs=True` (a CUDA cache) the step is captured once
    per size, here, and every call replays a graph, launching all its kernels at once. Capturing
    runs the step (PAD at position 0 of every row), so it happens before the cache holds any
    request. `compile=True` runs torch.compile's fused kernels (captured too, with graphs); it
    specialises on the first size and makes the batch dimension dynamic at the second, so two
    compilations serve every size. Without graphs the step runs on any device (the tests run
    this path on a CPU).
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        cuda_graphs: bool,
        compile: bool = True,
        batch_sizes: Sequence[int] | None = None,
    ) -> None:
        device = cache.device
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA cache, not one on {device}")
        self.model = model
        self.cache = cache
        self.sizes = sorted(set(batch_sizes or padded_batch_sizes(cache.batch_size)))
        if self.sizes[-1] > cache.batch_size:
            raise ValueError(f"batch sizes {self.sizes} exceed the cache's {cache.batch_size} rows")
        self.step = torch.compile(_static_step, fullgraph=True) if compile else _static_step
        most = self.sizes[-1]
        self.inputs = torch.zeros(2, most, dtype=torch.long, device=device)  # tokens, positions
        self.inputs[0] = PAD
        self.staging = torch.zeros(2, most, dtype=torch.long, pin_memory=cuda_graphs)
        self.caches = {s: cache.leading_rows(s) if s < cache.batch_size else cache for s in self.sizes}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if cuda_graphs:
            pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode():
                for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
                    self.graphs[size] = self._capture(size, pool)
            torch.cuda.synchronize(device)

    def _run(self, size: int) -> Tensor:
        return self.step(self.model, self.caches[size], self.inputs[0, :size], self.inputs[1, :size])

    def _capture(self, size: int, pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm up on a side stream (compilation, autotuning and library workspaces happen outside
        # the capture), as torch.cuda.graph requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._run(size)
        return graph, logits

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int]) -> Tensor:
        """Logits (n, V) of the active rows; with graphs, a view of the graph's output, valid until the next call."""
        rows = len(tokens)
        size = next(s for s in self.sizes if s >= rows)
        pad = size - rows
        # With graphs the engine has read the previous step's logits on the host by now, so no
        # copy out of the pinned staging buffer is still in flight.
        self.staging[:, :size] = torch.tensor([[*tokens, *[PAD] * pad], [*positions, *[0] * pad]])
        self.inputs[:, :size].copy_(self.staging[:, :size], non_blocking=True)
        if self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
        else:
            logits = self._run(size)
        if len(active) == size:
            return logits
        if list(active) == list(range(len(active))):
            return logits[: len(active)]
        return logits[torch.tensor(active, device=logits.device)]
