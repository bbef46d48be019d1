"""How the engine runs the model: the two model calls, and the decode step that repeats one of them.

`prefill` writes prompts into cache rows; `decode` feeds one token per row. The engine calls
`prefill` as requests arrive and a decode step once per token, through one of:

- `DynamicDecodeStep`: `decode` on rows 0..rows-1, shapes following the batch, on any device,
  eager or compiled. The engine knows every row's position, so the step never reads one back
  from the device.
- `StaticDecodeStep`: the same forward on fixed shapes (a few padded batch sizes, the whole
  cache), compiled by torch.compile; on CUDA captured in CUDA graphs once per size and replayed.
  A GPU runs a small model's step in far less time than the CPU takes to launch its hundreds of
  kernels one by one; a replay launches them all at once. It also picks the ids itself (greedy, or
  sampled at a temperature with a uniform number from the host) and can run the next step ahead
  while the host reads them (`StaticDecodeStep.pick`).
- `aot_step.AOTDecodeStep`: on a CPU, `DynamicDecodeStep`'s forward compiled ahead of time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from reasoning_llama.model import KVCache, Transformer
from reasoning_llama.sampling import inverse_cdf_, mask_unsampled_, never_sampled_ids
from reasoning_llama.tokenizer import PAD

__all__ = [
    "DecodeStep",
    "Draws",
    "DynamicDecodeStep",
    "StaticDecodeStep",
    "active_rows",
    "decode",
    "padded_batch_sizes",
    "prefill",
]

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
    return _decode_rows(model, cache.leading_rows(tokens.shape[0]), tokens, positions, active, cache_length)


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

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int]) -> Tensor:
        device = self.cache.device
        rows = len(tokens)
        return self.forward(
            self.model,
            self.cache.leading_rows(rows),
            torch.tensor(tokens, device=device),
            torch.tensor(positions, device=device),
            None if len(active) == rows else torch.tensor(active, device=device),
            max(positions) + 1,
        )


def active_rows(logits: Tensor, active: Sequence[int]) -> Tensor:
    """The rows `active` (ascending) of a step's logits for all its rows: a view when they lead."""
    if len(active) == logits.shape[0]:
        return logits
    if list(active) == list(range(len(active))):
        return logits[: len(active)]
    return logits[torch.tensor(active, device=logits.device)]


def padded_batch_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes a graph is captured for: powers of two below `max_batch_size`, then itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _static_step(
    model: Transformer, cache: KVCache, inputs: Tensor, draws: Tensor, never: Tensor
) -> tuple[Tensor, Tensor]:
    """One token per cache row over the whole cache (masked past each position): fp32 logits (n, V)
    and each row's pick under the special-id mask. Then the next step's inputs, in place: every
    live row's pick at its next position, so the step can run again before anyone reads this one.

    `inputs` (n, 4): a row's token, position, live (1 for a row holding a request) and eot_banned
    (1 for a row still reasoning, which may not end the turn). `draws` (n, 2): a row's temperature
    (0: greedy) and the uniform number its sampled id is drawn with (`sampling.pick_rows`'s rule).
    """
    tokens, positions, live, eot_banned = inputs.unbind(1)
    temperatures, uniforms = draws.unbind(1)
    logits = model(tokens.unsqueeze(1), positions.unsqueeze(1), kv_cache=cache, cache_length=cache.max_len)
    logits = logits[:, 0].float()
    masked = mask_unsampled_(logits.clone(), never, eot_banned.bool())
    sampled = temperatures > 0
    drawn = inverse_cdf_(masked / torch.where(sampled, temperatures, 1.0)[:, None], uniforms)
    picks = torch.where(sampled, drawn, masked.argmax(dim=-1))
    live = live.bool()
    # Clamped: a row past its last position has finished, and its next write must stay in the cache.
    next_positions = torch.where(live, (positions + 1).clamp(max=cache.max_len - 1), 0)
    inputs[:, 0].copy_(torch.where(live, picks, PAD))
    inputs[:, 1].copy_(next_positions)
    return logits, picks


@dataclass(frozen=True)
class Draws:
    """How each row of a step picks its id (one entry per row; idle rows anything): `<|endoftext|>`
    banned (1) or not, the temperature (0: greedy), and the uniform numbers its sampled ids are
    drawn with, this step's and, should the next step run ahead, the next one's."""

    eot_banned: list[int]
    temperatures: list[float]
    uniforms: list[float]
    next_uniforms: list[float]

    @classmethod
    def all_greedy(cls, rows: int) -> Draws:
        return cls([0] * rows, [0.0] * rows, [0.0] * rows, [0.0] * rows)


@dataclass
class _Launched:
    """A step on the device's queue: the inputs it ran on (host lists, one entry per row) and its outputs."""

    tokens: list[int]
    positions: list[int]
    live: list[int]
    eot_banned: list[int]
    temperatures: list[float]
    uniforms: list[float]
    outputs: tuple[Tensor, Tensor]  # logits (size, V), picks (size,)

    def serves(self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int]) -> bool:
        """Whether its outputs are those of a step on these inputs, for the active rows (the rest are
        idle, their outputs dropped)."""
        return all(
            i < len(self.live)
            and self.live[i]
            and self.tokens[i] == tokens[i]
            and self.positions[i] == positions[i]
            for i in active
        )

    def picks_as(self, draws: Draws, active: Sequence[int]) -> bool:
        """Whether its picks are those `draws` ask for, for the active rows."""
        return all(
            (self.eot_banned[i], self.temperatures[i], self.uniforms[i])
            == (draws.eot_banned[i], draws.temperatures[i], draws.uniforms[i])
            for i in active
        )


class _Upload:
    """A device buffer the host writes rows of through pinned memory, without waiting for the device.

    Two pinned staging buffers take turns, each with an event for its last copy: a write waits only
    for the copy before last (long done), never for the steps queued before the last one.
    `skip_unchanged`: a write of what the host last wrote is dropped (for a buffer the step does
    not write itself)."""

    def __init__(self, buffer: Tensor, *, skip_unchanged: bool = False) -> None:
        self.buffer = buffer
        cuda = buffer.device.type == "cuda"
        self.staging = [torch.zeros(buffer.shape, dtype=buffer.dtype, pin_memory=cuda) for _ in range(2)]
        self.copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.turn = 0
        self.last: list[list] | None = None if not skip_unchanged else []

    def write(self, rows: list[list]) -> None:
        """Rows 0..len(rows)-1 of the buffer, in stream order with the launches around the call."""
        if self.last is not None and rows == self.last[: len(rows)]:
            return
        self.turn ^= 1
        staging, copied = self.staging[self.turn], self.copied[self.turn]
        if copied is not None:
            copied.synchronize()
        staging[: len(rows)] = torch.tensor(rows, dtype=staging.dtype)
        self.buffer[: len(rows)].copy_(staging[: len(rows)], non_blocking=True)
        if copied is not None:
            copied.record()
        if self.last is not None:
            self.last[: len(rows)] = rows


class StaticDecodeStep:
    """The decode step on fixed shapes: padded batch sizes, the whole cache, static buffers.

    Every tensor the step touches has a fixed address and shape: the input buffers (a row's token,
    position and two flags; its temperature and uniform number), the whole KV cache (attention
    covers every slot, masked past each row's position, so no shape depends on the context length)
    and the outputs. A step pads its rows to the smallest of a few batch sizes that holds them
    (padding rows are free slots fed PAD at position 0, as idle rows always are, and their outputs
    are dropped), so continuous batching only ever meets those shapes.

    That is what CUDA graphs need: with `cuda_graphs=True` (a CUDA cache) the step is captured once
    per size, here, and every call replays a graph, launching all its kernels at once. Capturing
    runs the step (PAD at position 0 of every row), so it happens before the cache holds any
    request. `compile=True` runs torch.compile's fused kernels (captured too, with graphs): one
    compilation with a dynamic batch dimension serves every size but 1, which gets its own.
    Without graphs the step runs on any device (the tests run this path on a CPU).

    `pick` keeps the host off the critical path: the step picks each row's id itself (greedy, or
    sampled at the row's temperature with a uniform number the host drew for it: `Draws`) and
    writes the next step's inputs from them, so the next step can be launched before the host
    reads this one's ids (`may_run_ahead`). While the device runs it, the host does its
    bookkeeping; the next call uses it when its inputs turn out to be what the host wants (every
    active row fed the id it chose, one position on, picking as asked), and runs the step again
    when not (a request joined, a row was forced). Running again rewrites the same cache slots, so
    a step run ahead in vain costs time, never tokens.
    """

    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        *,
        cuda_graphs: bool,
        compile: bool = True,
        batch_sizes: Sequence[int] | None = None,
        run_ahead: bool = True,
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
        pinned = device.type == "cuda"
        # A row's inputs side by side, so every size's view is contiguous (its strides never vary).
        self.inputs = _Upload(torch.zeros(most, 4, dtype=torch.long, device=device))
        self.inputs.buffer[:, 0] = PAD
        self.draws = _Upload(torch.zeros(most, 2, device=device), skip_unchanged=True)
        self.picks = torch.zeros(most, dtype=torch.long, pin_memory=pinned)  # read back here
        self.read = torch.cuda.Event() if pinned else None  # the picks have reached the host
        self.never = torch.tensor(never_sampled_ids(model.config.vocab_size), device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor]]] = {}
        self.run_ahead = run_ahead  # False: `pick` never runs ahead (benchmarks/decode.py compares)
        self.ahead: _Launched | None = None  # a step launched before the host read the one before
        # Steps launched on inputs from the host, steps run ahead, and those of them used.
        self.counts = {"launched": 0, "ran_ahead": 0, "used_ahead": 0}
        if cuda_graphs:
            with self._on_device(), torch.inference_mode():
                pool = torch.cuda.graph_pool_handle()
                for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
                    self.graphs[size] = self._capture(size, pool)
            torch.cuda.synchronize(device)

    def _on_device(self) -> AbstractContextManager[object]:
        """The cache's GPU made current: streams, events and graph captures belong to the current
        device, and an engine on cuda:1 must not record them on cuda:0's."""
        cache = self.cache.device
        return torch.cuda.device(cache) if cache.type == "cuda" else nullcontext()

    def _run(self, size: int) -> tuple[Tensor, Tensor]:
        cache, inputs, draws = (
            self.cache.leading_rows(size),
            self.inputs.buffer[:size],
            self.draws.buffer[:size],
        )
        if size > 1:
            from torch._dynamo import mark_dynamic  # imported here: the compiler takes a second to load

            # The batch dimension is dynamic from the first compilation on: one graph serves every
            # size but 1 (which dynamo always specialises), instead of one for the first size seen,
            # another once a second size shows the dimension varies, and one for 1.
            for tensor in (*cache.keys, *cache.values, inputs, draws):
                mark_dynamic(tensor, 0)
        return self.step(self.model, cache, inputs, draws, self.never)

    def _capture(
        self, size: int, pool: tuple[int, int]
    ) -> tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor]]:
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
            outputs = self._run(size)
        return graph, outputs

    def _launch(self, size: int) -> tuple[Tensor, Tensor]:
        if self.graphs:
            self.replay(size)
            return self.graphs[size][1]
        return self._run(size)

    def replay(self, size: int) -> None:
        """Replay the graph captured for `size` rows on the buffers as they are (benchmarks time it)."""
        self.graphs[size][0].replay()

    def run_uncaptured(self, size: int) -> None:
        """Run the step for `size` rows on the buffers as they are, outside any graph (to profile its kernels)."""
        with self._on_device(), torch.inference_mode():
            self._run(size)

    def _size(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    def _launch_on(
        self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int], draws: Draws
    ) -> _Launched:
        """Write the inputs (padded to a captured size) and launch the step on them."""
        size = self._size(len(tokens))
        pad = size - len(tokens)
        live = [0] * size
        for i in active:
            live[i] = 1
        tokens, positions = [*tokens, *[PAD] * pad], [*positions, *[0] * pad]
        eot_banned = [*draws.eot_banned, *[0] * pad]
        temperatures, uniforms = [*draws.temperatures, *[0.0] * pad], [*draws.uniforms, *[0.0] * pad]
        self.inputs.write([list(row) for row in zip(tokens, positions, live, eot_banned, strict=True)])
        self.draws.write([list(row) for row in zip(temperatures, uniforms, strict=True)])
        self.counts["launched"] += 1
        return _Launched(tokens, positions, live, eot_banned, temperatures, uniforms, self._launch(size))

    def drop_ahead(self) -> None:
        """Forget the step run ahead, if any: cache rows were written since (a prefill), so it is stale."""
        self.ahead = None

    def _take_ahead(
        self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int], draws: Draws | None
    ) -> _Launched | None:
        ahead, self.ahead = self.ahead, None
        if ahead is None or not ahead.serves(tokens, positions, active):
            return None
        if draws is not None and not ahead.picks_as(draws, active):
            return None
        self.counts["used_ahead"] += 1
        return ahead

    def __call__(self, tokens: Sequence[int], positions: Sequence[int], active: Sequence[int]) -> Tensor:
        """Logits (n, V) of the active rows; with graphs, a view of the graph's output, valid until the next call."""
        with self._on_device():
            launched = self._take_ahead(tokens, positions, active, None) or self._launch_on(
                tokens, positions, active, Draws.all_greedy(len(tokens))
            )
        return active_rows(launched.outputs[0], active)

    def pick(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        active: Sequence[int],
        draws: Draws,
        *,
        may_run_ahead: bool,
    ) -> list[int]:
        """The active rows' ids, picked as `draws` say under the special-id mask; `may_run_ahead`:
        the next step may be launched on them (with `draws.next_uniforms`) before they are read."""
        with self._on_device():
            return self._pick(tokens, positions, active, draws, run_ahead=may_run_ahead and self.run_ahead)

    def _pick(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        active: Sequence[int],
        draws: Draws,
        *,
        run_ahead: bool,
    ) -> list[int]:
        launched = self._take_ahead(tokens, positions, active, draws) or self._launch_on(
            tokens, positions, active, draws
        )
        size = len(launched.live)
        self.picks[:size].copy_(launched.outputs[1], non_blocking=True)
        if self.read is not None:
            self.read.record()
        if run_ahead:
            # The step just launched wrote this one's inputs on the device; its graph is launched
            # for as few rows as hold the active ones (the inputs of the rows after are left alone).
            ahead_size = self._size(active[-1] + 1)
            temperatures = launched.temperatures[:ahead_size]
            uniforms = [*draws.next_uniforms, *[0.0] * size][:ahead_size]
            self.draws.write([[t, u] for t, u in zip(temperatures, uniforms, strict=True)])
            outputs = self._launch(ahead_size)
            self.counts["ran_ahead"] += 1
        if self.read is not None:
            self.read.synchronize()
        ids = self.picks[:size].tolist()
        if run_ahead:
            live = launched.live[:ahead_size]
            self.ahead = _Launched(
                [ids[i] if live[i] else PAD for i in range(ahead_size)],
                [
                    min(launched.positions[i] + 1, self.cache.max_len - 1) if live[i] else 0
                    for i in range(ahead_size)
                ],
                live,
                launched.eot_banned[:ahead_size],
                temperatures,
                uniforms,
                outputs,
            )
        return [ids[i] for i in active]
