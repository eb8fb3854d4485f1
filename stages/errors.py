"""The build side's error type: a failure the user can fix, shown as `[CODE] message` without a traceback."""

from __future__ import annotations

from fuseline.core.errors import FuselineError


class StageError(FuselineError):
    """A stage failure with a stable upper-case `code`; the message names the input, the place and the fix."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)
