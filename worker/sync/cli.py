"""`python -m worker.sync`: sync templates of a release onto a volume by hand (the worker does the same at
start when FUSELINE_RELEASE is set).

    python -m worker.sync --release s3://bucket/prefix/releases/main.json --volume /runpod-volume
    python -m worker.sync                      # FUSELINE_RELEASE, FUSELINE_VOLUME (default /runpod-volume)

Exit status 0 when every requested template is at the release's version, 2 otherwise (a bad FUSELINE_*
setting included: CONFIG_INVALID naming the variable).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fuseline.core.errors import ConfigInvalid
from worker.sync.settings import DEFAULT_WORKERS, SyncCommandSettings
from worker.sync.templates import sync_templates


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = SyncCommandSettings.from_env()
    except ConfigInvalid as err:
        print(f"error: {err}", file=sys.stderr)
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
    report = sync_templates(
        args.release or "",
        args.volume,
        args.templates,
        settings=settings,
        verify=args.verify,
        workers=args.workers,
    )
    print("\n".join(report.lines()), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2
