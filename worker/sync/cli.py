"""`python -m worker.sync`: sync templates of a release onto a volume by hand (the worker does the same at
start when FUSELINE_RELEASE is set).

    python -m worker.sync --release s3://bucket/prefix/releases/main.json --volume /runpod-volume
    python -m worker.sync                      # FUSELINE_RELEASE, FUSELINE_VOLUME (default /runpod-volume)

The report goes to stderr as log events (fuseline.core.logs: JSON lines off a terminal, text on one, every
string redacted): `sync.template` per template, then `sync.done`, as the worker logs its start-up sync.
Exit status 0 when every requested template is at the release's version, 2 otherwise (a bad FUSELINE_*
setting included: `sync.config_invalid`, CONFIG_INVALID naming the variable).
"""

from __future__ import annotations

import argparse
import logging
import traceback
from collections.abc import Sequence

from fuseline.core.errors import ConfigInvalid
from fuseline.core.logs import log_event, setup_logging
from worker.sync.settings import DEFAULT_WORKERS, SyncCommandSettings
from worker.sync.templates import sync_templates

log = logging.getLogger("fuseline.worker.sync")


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    try:
        settings = SyncCommandSettings.from_env()
    except ConfigInvalid as err:
        log_event(log, "sync.config_invalid", str(err), level=logging.ERROR)
        return 2
    parser = argparse.ArgumentParser(prog="python -m worker.sync", description=__doc__.splitlines()[0])
    parser.add_argument("--release", default=settings.release, help="s3://… or a path (FUSELINE_RELEASE)")
    parser.add_argument("--volume", default=str(settings.volume), help="default: FUSELINE_VOLUME")
    parser.add_argument("--template", action="append", dest="templates", help="repeatable; default: all")
    parser.add_argument("--verify", action="store_true", help="re-hash folders already present")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"parallel GETs (default FUSELINE_SYNC_WORKERS or {DEFAULT_WORKERS})",
    )
    args = parser.parse_args(argv)
    try:
        report = sync_templates(
            args.release or "",
            args.volume,
            args.templates,
            settings=settings,
            verify=args.verify,
            workers=args.workers,
        )
    except Exception as exc:  # a bug (sync_templates reports known failures): logged, not a raw traceback
        log_event(
            log,
            "sync.internal_error",
            f"[INTERNAL_ERROR] {type(exc).__name__}: {exc}",
            level=logging.ERROR,
            traceback=traceback.format_exc(),
        )
        return 2
    report.log(log)
    return 0 if report.ok else 2
