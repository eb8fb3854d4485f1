"""The one error type of publishing: a coded FuselineError whose message is redacted at birth."""

from __future__ import annotations

from fuseline.core.errors import FuselineError
from fuseline.core.redact import redact


class PublishError(FuselineError):
    """A publishing step failed; the message is one line naming the cause and the fix (never a secret)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(redact(message), code=code)

    def __str__(self) -> str:
        return self.message
