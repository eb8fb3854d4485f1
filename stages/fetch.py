"""Stage: fetch one catalog source into the shared download cache and print its local path.

    python -m stages.fetch <catalog path or source> [--catalog templates.json] [--cache DIR] [--out PATH]

The first argument is a catalog path as `Catalog.iter_sources()` names them (`vae`,
`checkpoints.<id>`, `checkpoints.<id>.config`, `templates.<id>.loras[<n>]`) or a source string that
appears in the catalog (its pin and allow_pickle come from there). `--out` places the fetched file
(hard link when possible, else a copy) or folder (symlink) at a path a DVC stage can declare as output.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

from fuseline.catalog import Catalog, Source
from fuseline.redact import install_redaction
from stages.runtime import CATALOG_FILE, StageError, load_project_catalog, setup_logging
from stages.sources import DownloadCache, fetch
from stages.sources.hf import CONFIG_FOLDER_PATTERNS

log = logging.getLogger("fuseline.stages.fetch")


def find_source(catalog: Catalog, spec: str | Source) -> tuple[Source, bool]:
    """(the catalog's Source for `spec`, whether it is a checkpoint's config folder)."""
    if isinstance(spec, Source):
        return spec, False
    for where, source in catalog.iter_sources():
        if spec in (where, source.source):
            return source, False
    for checkpoint_id, checkpoint in catalog.checkpoints.items():
        if checkpoint.config and spec in (f"checkpoints.{checkpoint_id}.config", checkpoint.config):
            return Source(source=checkpoint.config), True
    known = [where for where, _ in catalog.iter_sources()]
    raise StageError(
        "SOURCE_NOT_IN_CATALOG",
        f"{spec!r} is neither a source nor a source path in the catalog; known paths: {', '.join(known)}",
    )


def fetch_source(
    catalog: Catalog, source_spec: str | Source, cache_dir: str | os.PathLike[str] | None
) -> Path:
    """The verified local path of one catalog source (downloading it into `cache_dir` if needed)."""
    source, is_config = find_source(catalog, source_spec)
    return fetch(
        source,
        cache=DownloadCache(cache_dir),
        catalog=catalog,
        allow_patterns=CONFIG_FOLDER_PATTERNS if is_config else None,
    )


def place(path: Path, out: Path) -> None:
    """Put `path` at `out`: a hard link for a file (no second copy of the bytes), a copy across
    filesystems, a symlink for a folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.is_dir():
        shutil.rmtree(out)
    if path.is_dir():
        out.symlink_to(path.resolve(), target_is_directory=True)
        return
    try:
        os.link(path, out)
    except OSError:
        shutil.copyfile(path, out)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    install_redaction()
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__.split("\n")[0])
    parser.add_argument(
        "source", help="catalog path (checkpoints.<id>, templates.<id>.loras[0], vae) or source"
    )
    parser.add_argument("--catalog", default=CATALOG_FILE)
    parser.add_argument(
        "--cache", default=None, help="download cache (default: FUSELINE_CACHE_DIR or ~/.cache)"
    )
    parser.add_argument("--out", default=None, help="also place the result here (hard link / symlink)")
    args = parser.parse_args(argv)
    try:
        catalog = load_project_catalog(args.catalog)
        path = fetch_source(catalog, args.source, args.cache)
        if args.out:
            place(path, Path(args.out))
    except StageError as exc:
        print(f"error: fetch {args.source}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
