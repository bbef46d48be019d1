"""Batches built ahead of time on a background thread, so the accelerator never waits on the CPU.

The thread reads ahead from a `BatchLoader` without moving it; each batch handed to training moves
the loader to the position after that batch, so a checkpoint saves what was consumed, not what was
prefetched. On CUDA the batches are pinned, which lets `Batch.to(device, non_blocking=True)` copy
them while the previous step still runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from reasoning_llama.data.batching import Batch, BatchLoader


class Prefetcher:
    """An endless iterator of the loader's batches, `depth` of them made ahead; `close()` stops it."""

    def __init__(self, loader: BatchLoader, *, depth: int = 4, pin_memory: bool = False) -> None:
        self.loader, self.pin_memory = loader, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(loader.epoch, loader.batch_index), daemon=True, name="prefetch"
        )
        self._thread.start()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, (epoch, index) = item
        self.loader.seek(epoch, index)
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _produce(self, epoch: int, index: int) -> None:
        try:
            for batch, position in self.loader.batches_from(epoch, index):
                if self.pin_memory:
                    batch = batch.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._queue.put((batch, position), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(e)
