"""The sync's errors: one coded type per failure, str() `[CODE] message` like the worker's job errors (the
codes are listed in docs/operations.md, "Volume and sync")."""

from __future__ import annotations

from fuseline.core.errors import FuselineError


class SyncError(FuselineError):
    """A sync failure with a stable code; the message names the release, object or volume path at fault."""

    code = "SYNC_FAILED"

    def __init__(self, message: str) -> None:
        super().__init__(message)


class RemoteUnavailable(SyncError):
    code = "REMOTE_UNAVAILABLE"


class RemoteMissing(SyncError):
    code = "REMOTE_MISSING"


class ReleaseInvalid(SyncError):
    code = "RELEASE_INVALID"


class ObjectCorrupt(SyncError):
    code = "OBJECT_CORRUPT"


class VolumeError(SyncError):
    code = "VOLUME_ERROR"


class ListingUnsafe(SyncError):
    code = "LISTING_UNSAFE"


class VolumeFull(SyncError):
    code = "VOLUME_FULL"


class LockTimeout(SyncError):
    code = "LOCK_TIMEOUT"


class LockLost(SyncError):
    code = "LOCK_LOST"
