"""The error type of the remote's stores and archive: a coded FuselineError, redacted at birth."""

from __future__ import annotations

from fuseline.core.errors import FuselineError
from fuseline.core.redact import redact


class RemoteError(FuselineError):
    """A remote could not be used; the message is one line naming the cause and the fix (never a secret)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(redact(message), code=code)

    def __str__(self) -> str:
        return self.message
