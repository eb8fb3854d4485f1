"""Publishing built templates to a DVC remote (local folder or S3) with release manifests.

    errors.py    PublishError
    stores.py    the remote's configuration and an object store over it
    project.py   the build project: dvc.lock, dvc status, what CI has to rebuild
    releases.py  publish, read, list and roll back releases
    gc.py        garbage collection, local and on the remote

`fuseline/cli/publish.py` is the command line over these.
"""
