"""The one error class for bad input data, and the problem records validation returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """A data file or folder cannot be used; says which file and how to fix it.

    The message reads ``"FILE: reason. Fix: ..."``.

    Attributes:
        file: the file or folder at fault.
        reason: what is wrong, with the expected and the found value.
        fix: what the user should do.
    """

    def __init__(self, file: str | Path, reason: str, fix: str) -> None:
        self.file = str(file)
        self.reason = reason.rstrip(".")
        self.fix = fix.rstrip(".")
        super().__init__(f"{self.file}: {self.reason}. Fix: {self.fix}.")


@dataclass(frozen=True)
class Problem:
    """One reason why a case cannot be used.

    Attributes:
        file: the file (or folder) at fault.
        reason: what is wrong, with expected and found values.
        fix: what the user should do.
    """

    file: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason.rstrip('.')}. Fix: {self.fix.rstrip('.')}."

    def to_error(self) -> DataError:
        """The :class:`DataError` that reports this problem."""
        return DataError(self.file, self.reason, self.fix)
