"""Bridge the engine's continuous batching to asyncio.

ONE background thread owns the engine: it admits submitted jobs with `engine.add_request`,
loops `engine.step()` while there is work, sleeps on a condition otherwise, and hands each
request's events to the event loop that waits for them (`loop.call_soon_threadsafe`).
Request handlers never touch the engine's batch themselves; they only submit and cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from reasoning_llama.generation import Delta, Engine, GenerationResult, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is at its limit."""


class EngineFailed(Exception):
    """The engine raised while generating this request."""


class Job:
    """One submitted request, seen from the event loop: its events arrive on `events`."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted_at = time.perf_counter()
        self.events: asyncio.Queue[Delta | GenerationResult | BaseException] = asyncio.Queue()
        self._loop = loop
        self._lock = threading.Lock()
        self._cancelled = False
        self._request: Any = None  # the engine's Request once admitted
        self.done = False
        self.first_text_at: float | None = None  # set by the worker thread

    def cancel(self) -> None:
        """Thread-safe; a no-op once the job has finished."""
        with self._lock:
            self._cancelled = True
            request = self._request
        if request is not None and not self.done:
            request.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _attach(self, request: Any) -> bool:
        """Record the engine request; False if the job was cancelled before it got one."""
        with self._lock:
            self._request = request
            cancelled = self._cancelled
        if cancelled:
            request.cancel()
        return not cancelled

    def _deliver(self, item: Delta | GenerationResult | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def results(self) -> AsyncIterator[Delta | GenerationResult]:
        """The job's Deltas then its GenerationResult; cancels the job if the consumer leaves early."""
        try:
            while True:
                item = await self.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            if not self.done:
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
        self.on_finish = on_finish  # called on the worker thread with every result, cancelled ones too
        self.capacity = engine.max_batch_size + max_queue
        self._cond = threading.Condition()
        self._incoming: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # engine request id -> job, touched by the worker thread only
        self._outstanding = 0  # submitted and not yet finished
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    # -- called from the event loop -------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        job = Job(prompt_ids, params, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._outstanding >= self.capacity:
                raise QueueFull(f"all {self.capacity} places (slots + queue) are taken")
            self._outstanding += 1
            self._incoming.append(job)
            self._cond.notify()
        return job

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def waiting(self) -> int:
        """Submitted but not generating yet (ours not yet handed over, plus the engine's queue)."""
        return len(self._incoming) + self.engine.num_waiting

    @property
    def active(self) -> int:
        return self.engine.num_active

    # -- the worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._incoming or self.engine.has_work()):
                    self._cond.wait()
                if self._stopping:
                    break
                incoming = list(self._incoming)
                self._incoming.clear()
            for job in incoming:
                self._admit(job)
            if self.engine.has_work():
                self._step()
        self._shutdown()

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job)
            return
        try:
            request = self.engine.add_request(job.prompt_ids, job.params)
        except Exception as e:  # a RequestError the handler's checks did not catch
            job._deliver(e)
            self._finish(job)
            return
        self._jobs[request.id] = job
        job._attach(request)

    def _step(self) -> None:
        try:
            results = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests in flight")
            self.last_error = f"{type(e).__name__}: {e}"
            for job in list(self._jobs.values()):
                job._deliver(EngineFailed(f"generation failed: {type(e).__name__}: {e}"))
                job.cancel()
                self._finish(job)
            self._jobs.clear()
            time.sleep(0.1)  # do not spin if the engine keeps failing
            return
        for request, events in results:
            job = self._jobs.get(request.id)
            if job is None:  # a request whose job already failed
                continue
            for event in events:
                if isinstance(event, GenerationResult):
                    del self._jobs[request.id]
                    self._finish(job)
                    self._report(job, event)
                elif job.first_text_at is None:
                    job.first_text_at = time.perf_counter()
                job._deliver(event)

    def _report(self, job: Job, result: GenerationResult) -> None:
        if self.on_finish is None:
            return
        try:
            self.on_finish(job, result)
        except Exception:
            log.exception("on_finish callback failed")

    def _finish(self, job: Job) -> None:
        job.done = True
        with self._cond:
            self._outstanding -= 1

    def _shutdown(self) -> None:
        """Cancel what is left so that no waiting handler hangs."""
        for job in [*self._incoming, *self._jobs.values()]:
            job._deliver(QueueFull("the server is shutting down"))
        self._incoming.clear()
        self._jobs.clear()
