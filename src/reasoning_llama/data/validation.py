"""Row validation: keep rows whose fields are non-empty strings, count and locate the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHAT_FIELDS = ("user", "reasoning", "assistant")
TEXT_FIELDS = ("text",)
MAX_LOCATIONS = 10  # offending rows named in a report


@dataclass
class ValidationReport:
    """How many rows were read, kept and skipped (by reason), and where the first bad ones are."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    first_offending: list[str] = field(default_factory=list)  # "file:line: reason" or "split[index]: reason"

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self, row: Any, fields: tuple[str, ...], where: str) -> dict[str, str] | None:
        """The row reduced to `fields` (plus a string `family`), or None after counting why it was skipped."""
        self.rows_read += 1
        problem = row_problem(row, fields)
        if problem is not None:
            reason, detail = problem
            self.skip(where, reason, detail)
            return None
        self.rows_kept += 1
        kept = {name: row[name] for name in fields}
        if isinstance(row.get("family"), str):
            kept["family"] = row["family"]
        return kept

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first_offending) < MAX_LOCATIONS:
            self.first_offending.append(f"{where}: {reason}{detail}")

    def summary(self) -> str:
        """One line: counts, reasons and the first offending rows."""
        text = f"read {self.rows_read} rows, kept {self.rows_kept}, skipped {self.rows_skipped}"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.items())
            text += f" ({reasons}); first offending rows: {'; '.join(self.first_offending)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": self.rows_skipped,
            "skipped": dict(self.skipped),
            "first_offending": list(self.first_offending),
            "summary": self.summary(),
        }


def row_problem(row: Any, fields: tuple[str, ...]) -> tuple[str, str] | None:
    """(reason, detail) for the first thing wrong with `row`, or None when every field is usable text."""
    if not isinstance(row, dict):
        return "not an object", f" ({type(row).__name__})"
    for name in fields:
        value = row.get(name)
        if value is None:
            return f"missing field '{name}'", ""
        if not isinstance(value, str):
            return f"non-string field '{name}'", f" ({type(value).__name__})"
        if not value.strip():
            return f"empty field '{name}'", ""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
            return f"invalid unicode in field '{name}'", ""
    return None
