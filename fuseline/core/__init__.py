"""The core everything else stands on: catalog, manifest, release, redaction, logs, errors, settings, S3
access, safetensors file access, atomic files and local locks, the serving rules, the build-metrics layout.

It imports nothing from fuseline outside it, nor stages/, worker/, the test kit, torch, diffusers or DVC
(boto3 only inside the client factory in s3.py): `make lint` (import-linter, .importlinter) checks it.
"""
