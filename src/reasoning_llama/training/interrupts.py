"""Ctrl-C (and SIGTERM outside torchrun) during a run: the first finishes the step and saves, a
second one aborts."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from reasoning_llama.training import distributed as dist

# A second Ctrl-C this soon after the first is the same one, forwarded (torchrun passes the terminal's
# Ctrl-C on to processes that had it already): only a later one aborts.
SECOND_CTRL_C_AFTER = 1.0


@contextmanager
def sigint_flag(*, announce: bool = True, processes: int = 1) -> Iterator[threading.Event]:
    """First Ctrl-C sets the flag (the loop saves and stops); a second one aborts at once.

    A process of its own (not under torchrun) takes SIGTERM the same way: what `docker stop`, a
    scheduler's preemption or `kill` send before they kill. Under torchrun SIGTERM stays the agent's
    way to stop its workers (after a rank failed, to restart the group)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    first = [0.0]

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            if time.monotonic() - first[0] > SECOND_CTRL_C_AFTER:
                raise KeyboardInterrupt
            return
        flag.set()
        first[0] = time.monotonic()
        if announce:
            what, again = ("interrupted", "Ctrl-C") if signum == signal.SIGINT else ("terminated", "SIGTERM")
            also = " (and, as the processes agree on it, the next)" if processes > 1 else ""
            print(
                f"\n{what}: finishing this step{also}, then saving a checkpoint ({again} again to abort)",
                file=sys.stderr,
            )

    signals = [signal.SIGINT] + ([] if dist.launched_by_torchrun() else [signal.SIGTERM])
    previous = {s: signal.getsignal(s) for s in signals}  # None: set outside Python, left as it is
    for s in signals:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, handler_before in previous.items():
            if handler_before is not None:
                signal.signal(s, handler_before)
