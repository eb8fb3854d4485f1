"""The error type of publishing: a coded RemoteError (the remote's own errors are RemoteErrors too)."""

from __future__ import annotations

from fuseline.remote.errors import RemoteError


class PublishError(RemoteError):
    """A publishing step failed; the message is one line naming the cause and the fix (never a secret)."""
