"""The one error base class: every failure fuseline reports to a person carries a stable upper-case code.

Stages, sources, the catalog, publishing, the worker's jobs and its sync all raise subclasses of
`FuselineError`. Callers and tests match on `code`, never on the wording; the message names the input, the
place and the fix. How an error is shown stays with its caller (a stage prints `[CODE] message`, the worker
answers `[CODE] message`, the CLI prints `error [CODE]: message`).
"""

from __future__ import annotations

import re

CODE_PATTERN = re.compile(r"^[A-Z][A-Z0-9_]*$")


class FuselineError(Exception):
    """A failure with a stable upper-case `code` and a one-line `message` naming input, place and fix.

    A subclass sets `code` as a class attribute (one type per code), or passes `code=` when one type
    carries many codes (stage and publish errors)."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if not CODE_PATTERN.match(self.code):
            raise ValueError(f"error code {self.code!r} is not upper-case (A-Z, digits, _)")
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ConfigInvalid(FuselineError):
    """A FUSELINE_* (or AWS_*) environment variable that cannot be used: the message names the variable,
    its value and the fix. Raised when a process's settings are parsed, at its start."""

    code = "CONFIG_INVALID"
