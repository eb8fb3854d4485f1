"""The worker's model sync: released template folders from a DVC remote onto the network volume, verified,
atomic, lock-protected. No torch, no diffusers, no DVC (`make lint` checks it): it runs at worker start and
as `python -m worker.sync`.

    settings.py   FUSELINE_SYNC_* (SyncSettings) and the CLI's own settings
    errors.py     SyncError and its coded subclasses
    remote.py     the release and its objects on S3 or in a local DVC remote folder
    volume.py     the volume's store, versions, atomic switch and reader leases
    locks.py      the cross-machine lock of one template
    objects.py    fetching objects: ranged GETs, resume journal, md5 while landing
    recipes.py    the runtime-LoRA fallback's recipes and file layout on the volume
    templates.py  sync_templates: one release onto one volume
    cli.py        `python -m worker.sync`
"""
