"""User-facing errors. Each names where the problem is so it can be fixed without a debugger."""
from __future__ import annotations

from dataclasses import dataclass


class TunesmithError(Exception):
    """A mistake in the user's config, data or command line; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class DataIssue:
    """One bad row: which file, which 1-based line (or row), which field, and what is wrong."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line is not None else "")
        what = f" field '{self.field}'" if self.field else ""
        return f"{where}:{what} {self.message}".replace(": ", ": ", 1)


class DataError(TunesmithError):
    """Raised with every issue found (capped), so `validate` can list them all at once."""

    MAX_SHOWN = 50

    @classmethod
    def raise_if_any(cls, issues: list[DataIssue]) -> None:
        """Raise one DataError listing the first MAX_SHOWN issues and counting all of them."""
        if issues:
            raise cls(issues[: cls.MAX_SHOWN], total=len(issues))

    def __init__(self, issues: list[DataIssue], total: int | None = None):
        self.issues = issues
        self.total = total if total is not None else len(issues)
        shown = "\n".join(f"  {i}" for i in issues)
        more = f"\n  ... and {self.total - len(issues)} more" if self.total > len(issues) else ""
        noun = "problem" if self.total == 1 else "problems"
        super().__init__(f"{self.total} data {noun}:\n{shown}{more}")
