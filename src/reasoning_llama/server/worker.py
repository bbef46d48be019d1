"""Bridge the engine's continuous batching to asyncio.

ONE background thread drives the engine: it loops `engine.step()` while there is work and sleeps
on a condition otherwise. Handlers submit straight into the engine's queue (`add_request` is
thread-safe) and cancel through the engine's request; the engine hands every event to the job's
`deliver`, which moves it onto the event loop (`loop.call_soon_threadsafe`). Queueing, the cancel
flag and timings are the engine's; the worker keeps only the capacity limit and the jobs it owes
an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

from reasoning_llama.generation import Delta, Engine, GenerationResult, Request
from reasoning_llama.sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


class ShuttingDown(QueueFull):
    """The server is stopping: it takes no request, and ends those still running at its deadline."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down")


class EngineFailed(Exception):
    """The engine raised while generating this request."""


class Job:
    """One submitted request, seen from the event loop: its events arrive on `events`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.events: asyncio.Queue[Delta | GenerationResult | BaseException] = asyncio.Queue()
        self.loop = loop
        self.request: Request | None = None  # set by EngineWorker.submit

    def cancel(self) -> None:
        """Thread-safe; a no-op once the request has finished."""
        if self.request is not None:
            self.request.cancel()

    def deliver(self, item: Delta | GenerationResult | BaseException) -> None:
        """Hand an event to the waiting handler (from any thread)."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def results(self) -> AsyncIterator[Delta | GenerationResult]:
        """The job's Deltas then its GenerationResult; cancels the job if the consumer leaves early."""
        finished = False
        try:
            while True:
                item = await self.events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()


class EngineWorker:
    def __init__(
        self,
        engine: Engine,
        *,
        max_queue: int,
        on_finish: Callable[[Job, GenerationResult], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_finish = on_finish  # called on the stepping thread with every result, cancelled ones too
        self.capacity = engine.max_batch_size + max_queue
        self._cond = threading.Condition()
        self._jobs: set[Job] = set()  # submitted, still owed a result (guarded by _cond)
        self._stopping = False
        self._deadline = math.inf  # once stopping: when the requests still running are ended
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- called from the event loop -------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def begin_stop(self, grace_s: float = 0.0) -> None:
        """Take no more requests; let those submitted run for `grace_s` seconds at most, then end what
        is left with "the server is shutting down". Returns at once: safe from a signal handler (the
        lock is reentrant)."""
        with self._cond:
            self._stopping = True
            self._deadline = min(self._deadline, time.monotonic() + grace_s)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Queue a generation in the engine; raises QueueFull at capacity, RequestError for bad input."""
        return self.submit_all([(prompt_ids, params)])[0]

    def submit_all(self, requests: Sequence[tuple[list[int], SamplingParams]]) -> list[Job]:
        """Queue one generation per (prompt ids, SamplingParams), all or none (QueueFull, RequestError)."""
        for prompt_ids, p in requests:
            self.engine.check_request(prompt_ids, p)
        loop = asyncio.get_running_loop()
        jobs = [Job(loop) for _ in requests]
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if self.outstanding + len(jobs) > self.capacity:
                raise QueueFull(
                    f"{len(jobs)} more requests do not fit: {self.outstanding} of the {self.capacity} "
                    "places (slots + queue) are taken"
                    if len(jobs) > 1
                    else f"all {self.capacity} places (slots + queue) are taken"
                )
            for job, (prompt_ids, p) in zip(jobs, requests, strict=True):
                job.request = self.engine.add_request(
                    prompt_ids, p, on_event=lambda event, job=job: self._on_event(job, event)
                )
                self._jobs.add(job)
            self._cond.notify()
        return jobs

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def outstanding(self) -> int:
        """Submitted and not yet finished."""
        return self.engine.num_active + self.engine.num_waiting

    @property
    def waiting(self) -> int:
        """Submitted but not generating yet."""
        return self.engine.num_waiting

    @property
    def active(self) -> int:
        return self.engine.num_active

    # -- the stepping thread ------------------------------------------------------------------
    def _on_event(self, job: Job, event: Delta | GenerationResult) -> None:
        with self._cond:
            if job not in self._jobs:  # a job that already failed
                return
            if isinstance(event, GenerationResult):
                self._jobs.discard(job)
        if isinstance(event, GenerationResult):
            self._report(job, event)
        job.deliver(event)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self.engine.has_work()):
                    self._cond.wait()
                if self._stopping and (not self.engine.has_work() or time.monotonic() >= self._deadline):
                    break
            self._step()
        self._shutdown()

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests in flight")
            self.last_error = f"{type(e).__name__}: {e}"
            self._fail_all(EngineFailed(f"generation failed: {type(e).__name__}: {e}"))
            time.sleep(0.1)  # do not spin if the engine keeps failing

    def _report(self, job: Job, result: GenerationResult) -> None:
        if self.on_finish is None:
            return
        try:
            self.on_finish(job, result)
        except Exception:
            log.exception("on_finish callback failed")

    def _fail_all(self, error: BaseException) -> None:
        """Answer every job still owed a result with `error` and cancel its request."""
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
        for job in jobs:
            job.deliver(error)
            job.cancel()

    def _shutdown(self) -> None:
        """Answer what is left so that no waiting handler hangs."""
        self._fail_all(ShuttingDown())
