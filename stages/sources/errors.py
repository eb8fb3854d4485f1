"""The one error type the sources library raises: a StageError whose message is redacted at birth."""

from __future__ import annotations

from fuseline.core.redact import redact
from stages.errors import StageError


class SourceError(StageError):
    """A download or lookup failure the user can fix. `code` is stable (tests and callers match on it);
    the message names the source, what happened and the fix, and never carries a secret: it is passed
    through `fuseline.core.redact.redact` here, so no caller can forget to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, redact(message))
