"""The project's DVC remote as fuseline's build side uses it beyond DVC: an object store over a local folder
or an S3 bucket, and the archive of sources kept in it. Below publishing and the stages (both use it), above
the core; the worker has its own read-only sync and never imports this.

    errors.py    RemoteError
    stores.py    the remote's configuration (as DVC resolves it) and an object store over it
    archive.py   the source archive: every source of a build, content-addressed by sha256
"""
