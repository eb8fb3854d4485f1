"""Publishing built templates to a DVC remote (local folder or S3) with release manifests.

    errors.py    PublishError
    project.py   the build project: dvc.lock, dvc status, what CI has to rebuild
    releases.py  publish, read, list and roll back releases
    gc.py        garbage collection, local and on the remote

The remote's configuration and object stores are fuseline/remote/ (the stages' source archive uses them
too); `fuseline/cli/publish.py` is the command line over these.
"""
