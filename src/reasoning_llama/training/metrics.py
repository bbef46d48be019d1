"""Run metrics: one JSON object per line in RUN/metrics.jsonl, mirrored to TensorBoard when installed."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from reasoning_llama import atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Append-only JSONL log of training events; each record carries its optimizer `step`.

    `resumed_at`: the step the run continues from (0 at its start). Records an earlier attempt logged
    after it are gone from the JSONL already (`truncate_after`); TensorBoard is told to hide its own.
    """

    def __init__(self, run_dir: str | Path, *, resumed_at: int = 0, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        hidden_from = resumed_at + 1 if resumed_at else 0  # a run at its start keeps no earlier step
        self._tb = _tensorboard_writer(Path(run_dir) / TENSORBOARD_DIR, hidden_from) if tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensorboard_writer(directory: Path, purge_step: int) -> Any:
    """A SummaryWriter, or None when tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory), purge_step=purge_step)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of RUN/metrics.jsonl (a JSON object with an integer `step`); other lines, such as
    a torn last line of a killed run, are skipped with a warning naming them."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            log.warning(
                "%s:%d: skipping a line that is no metrics record (a JSON object with a step)", path, number
            )
    return records


def truncate_after(run_dir: str | Path, step: int) -> None:
    """Drop records logged after `step`, so a resumed run's log reads as if it never stopped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", math.inf) <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
