"""Fixed-shape (batch_size, seq_len) batches of tokenized examples, packed or one per row.

An example e of n tokens contributes inputs e[:-1], targets e[1:] and loss mask m[1:], so
it occupies n - 1 positions of a row; doc_ids keep attention inside it and positions restart
at 0, which makes its predictions the same packed or alone. Padding (inputs and targets PAD,
loss mask False) only fills the end of a row, with a doc id of its own.

Under data parallelism each rank builds only its share of a global batch, but every rank knows how
many loss tokens the whole global batch holds (`n_loss_tokens_all_ranks`), so the token-level mean
needs no communication. A position is saved in rows consumed, so a run resumes at another world size.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reasoning_llama.data.packing import best_fit_pack
from reasoning_llama.data.prepare import TokenizedSplit
from reasoning_llama.errors import ConfigError, DataError
from reasoning_llama.tokenizer import PAD


@dataclass
class Batch:
    """One micro-batch; every tensor is (batch_size, seq_len)."""

    inputs: Tensor  # long
    targets: Tensor  # long
    loss_mask: Tensor  # bool, True where the target counts
    doc_ids: Tensor  # long, one id per example within a row; padding has its own
    positions: Tensor  # long, RoPE positions restarting at each example
    n_loss_tokens: int
    n_tokens: int  # non-padding positions computed
    # The same counts for the whole global batch this is one rank's share of (-1: this batch's own).
    n_loss_tokens_all_ranks: int = -1
    n_tokens_all_ranks: int = -1

    def __post_init__(self) -> None:
        if self.n_loss_tokens_all_ranks < 0:
            self.n_loss_tokens_all_ranks = self.n_loss_tokens
        if self.n_tokens_all_ranks < 0:
            self.n_tokens_all_ranks = self.n_tokens

    @property
    def loss_token_fraction(self) -> float:
        """Share of the computed positions (padding included) that carry loss."""
        return self.n_loss_tokens / self.inputs.numel()

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        tensors = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in tensors}
        return Batch(**tensors, **counts)

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory, so `to(cuda, non_blocking=True)` overlaps with compute."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in tensors.items():
            if isinstance(value, Tensor):
                tensors[name] = value.pin_memory()
        return Batch(**tensors)


class BatchLoader:
    """Endless batches of a split, reshuffled each epoch from `seed + epoch`, resumable exactly.

    With `packing`, rows are built once by best-fit packing (seeded) and each epoch shuffles
    the rows; without it, each row holds one example. Every batch has `batch_size` rows: the
    last ones of an epoch are filled up with empty (all-padding) rows, so no example is lost or
    repeated. With `world_size` > 1 each rank takes a disjoint, interleaved share of every
    global batch of `batch_size * world_size` rows. An epoch is a whole number of optimizer steps
    of `batches_per_step` batches, so a step never mixes two epochs and holds the same rows
    whatever the world size (one process accumulating two batches, or two processes one each).
    """

    def __init__(
        self,
        split: TokenizedSplit,
        *,
        seq_len: int,
        batch_size: int,
        packing: bool,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        batches_per_step: int = 1,
        max_rows: int | None = None,
    ) -> None:
        if seq_len <= 0 or batch_size <= 0 or batches_per_step <= 0:
            raise ConfigError(
                f"seq_len, batch_size and batches_per_step must be positive, got {seq_len}, {batch_size} "
                f"and {batches_per_step}"
            )
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must lie in 0..world_size-1, got rank {rank} of {world_size}")
        self.split = split
        self.seq_len, self.batch_size, self.packing = seq_len, batch_size, packing
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.batches_per_step = batches_per_step
        positions_used = np.array([len(ids) - 1 for ids in split.ids], dtype=np.int64)
        if len(positions_used) and (positions_used.max() > seq_len or positions_used.min() < 1):
            raise DataError(
                f"examples must have 2..{seq_len + 1} tokens to fit rows of {seq_len}, found "
                f"{positions_used.min() + 1}..{positions_used.max() + 1}; prepare the data with seq_len={seq_len}"
            )
        # Identifies the split's layout in a saved position, so resuming on other data fails loudly.
        self._layout = zlib.crc32(positions_used.tobytes())
        if packing:
            self.rows = best_fit_pack(positions_used, seq_len, seed)
        else:
            self.rows = [[i] for i in range(len(positions_used))]
        # The first rows alone, the same ones whatever the world size (packing does not depend on it):
        # a validation set of a fixed size, evaluated alike by one process or many.
        self.rows = self.rows[:max_rows]
        loss_tokens = np.array([int(np.count_nonzero(m[1:])) for m in split.loss_mask], dtype=np.int64)
        self._row_loss_tokens = np.array([loss_tokens[r].sum() for r in self.rows], dtype=np.int64)
        self._row_tokens = np.array([positions_used[r].sum() for r in self.rows], dtype=np.int64)
        self.epoch = 0
        self.batch_index = 0  # the next batch of `epoch` to yield
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows)

    @property
    def segments_per_row(self) -> int:
        """The most runs of one example (or of padding) in any row: room for varlen attention."""
        padded = self._row_tokens < self.seq_len
        return max(
            1, max((len(row) + int(pad) for row, pad in zip(self.rows, padded, strict=True)), default=1)
        )

    @property
    def global_batch_rows(self) -> int:
        """Rows of one global batch: this rank's `batch_size` times the world size."""
        return self.batch_size * self.world_size

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step over all ranks."""
        return self.global_batch_rows * self.batches_per_step

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank yields per epoch (the same on every rank): whole steps."""
        return math.ceil(self.rows_per_epoch / self.rows_per_step) * self.batches_per_step

    def __iter__(self) -> Iterator[Batch]:
        """Batches forever from the current position; the position advances before each yield."""
        for batch, (epoch, index) in self.batches_from(self.epoch, self.batch_index):
            self.seek(epoch, index)
            yield batch

    def batches_from(self, epoch: int, index: int) -> Iterator[tuple[Batch, tuple[int, int]]]:
        """Batches forever from (epoch, index), each with the position after it; the loader's own
        position is left alone (a prefetching thread reads ahead while training consumes)."""
        if self.batches_per_epoch == 0:
            raise DataError("no examples to batch: the split is empty")
        while True:
            batch = self._batch(epoch, index)
            index += 1
            if index == self.batches_per_epoch:
                epoch, index = epoch + 1, 0
            yield batch, (epoch, index)

    def seek(self, epoch: int, index: int) -> None:
        """Make (epoch, index) the position: the next batch yielded and the one `state_dict` saves."""
        self.epoch, self.batch_index = epoch, index

    def epoch_batches(self, epoch: int = 0) -> Iterator[Batch]:
        """One finite pass over `epoch` (e.g. for validation); leaves the position alone."""
        for index in range(self.batches_per_epoch):
            yield self._batch(epoch, index)

    def iter_epoch_once(self) -> Iterator[Batch]:
        """One finite pass over epoch 0."""
        return self.epoch_batches(0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "packing": self.packing,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rows_per_step": self.rows_per_step,
            "examples": len(self.split),
            "layout_crc32": self._layout,
            "rows_per_epoch": self.rows_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the batch after the one last yielded when `state` was taken."""
        mine = self.state_dict()
        # Rows per batch and the world size may change (a resume on more or fewer GPUs): the position
        # is kept in rows consumed, which then must fall on a batch boundary of the new layout.
        free = ("epoch", "batch_index", "batch_size", "world_size", "rows_per_step")
        changed = [
            f"{key} {state.get(key)!r} -> {mine[key]!r}"
            for key in mine
            if key not in free and state.get(key) != mine[key]
        ]
        if changed:
            raise DataError(
                "cannot resume the data position: the data or batching settings changed since it was "
                f"saved ({', '.join(changed)}); resume with the same data and settings"
            )
        rows_done = int(state["batch_index"]) * int(state["batch_size"]) * int(state["world_size"])
        index, remainder = divmod(rows_done, self.global_batch_rows)
        if remainder:
            # The rows consumed must be whole batches of the new layout: a micro-batch size whose rows
            # on all processes divide them, and the rows of a step (as training checks), works; the
            # saved one always does, on its world size.
            fitting = [
                m
                for m in range(self.batch_size, 0, -1)
                if rows_done % (m * self.world_size) == 0 and self.rows_per_step % (m * self.world_size) == 0
            ]
            saved = f"the saved {state['batch_size']} rows on {state['world_size']} process(es)"
            hint = f"--set train.micro_batch_size={fitting[0]} or {saved}" if fitting else saved
            raise DataError(
                f"cannot resume the data position: {rows_done} rows of the epoch were consumed, which is no "
                f"whole number of batches of {self.batch_size} x {self.world_size} rows (micro-batch x "
                f"processes); resume with micro-batches whose rows on all processes divide {rows_done}: {hint}"
            )
        if not 0 <= index < max(1, self.batches_per_epoch) or state["epoch"] < 0:
            raise DataError(f"invalid data position: epoch {state['epoch']}, batch {state['batch_index']}")
        self.seek(int(state["epoch"]), index)

    # -- building batches ---------------------------------------------------------------
    def _row_order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng(self.seed + epoch).permutation(self.rows_per_epoch)
            else:
                order = np.arange(self.rows_per_epoch)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _batch(self, epoch: int, index: int) -> Batch:
        global_size = self.batch_size * self.world_size
        global_rows = self._row_order(epoch)[index * global_size : (index + 1) * global_size]
        mine = global_rows[self.rank :: self.world_size]
        batch = self._make_batch([self.rows[r] for r in mine])
        batch.n_loss_tokens_all_ranks = int(self._row_loss_tokens[global_rows].sum())
        batch.n_tokens_all_ranks = int(self._row_tokens[global_rows].sum())
        return batch

    def _make_batch(self, rows: list[list[int]]) -> Batch:
        shape = (self.batch_size, self.seq_len)
        inputs = np.full(shape, PAD, dtype=np.int64)
        targets = np.full(shape, PAD, dtype=np.int64)
        loss_mask = np.zeros(shape, dtype=np.bool_)
        doc_ids = np.zeros(shape, dtype=np.int64)
        positions = np.tile(np.arange(self.seq_len, dtype=np.int64), (self.batch_size, 1))
        n_tokens = 0
        for b, examples in enumerate(rows):
            start = 0
            for doc, example in enumerate(examples):
                ids, mask = self.split.ids[example], self.split.loss_mask[example]
                end = start + len(ids) - 1
                inputs[b, start:end] = ids[:-1]
                targets[b, start:end] = ids[1:]
                loss_mask[b, start:end] = mask[1:]
                doc_ids[b, start:end] = doc
                positions[b, start:end] = np.arange(end - start)
                start = end
            doc_ids[b, start:] = len(examples)
            positions[b, start:] = np.arange(self.seq_len - start)
            n_tokens += start
        return Batch(
            inputs=torch.from_numpy(inputs),
            targets=torch.from_numpy(targets),
            loss_mask=torch.from_numpy(loss_mask),
            doc_ids=torch.from_numpy(doc_ids),
            positions=torch.from_numpy(positions),
            n_loss_tokens=int(loss_mask.sum()),
            n_tokens=n_tokens,
        )
