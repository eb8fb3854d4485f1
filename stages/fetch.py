"""Stage: fetch catalog sources into the shared download cache; write the pipeline's source receipts.

    python -m stages.fetch <catalog path or source> [--catalog templates.json] [--cache DIR] [--out PATH]
    python -m stages.fetch --receipt <vae | checkpoints.<id> | templates.<id>> --receipt-out PATH
                           [--cache DIR]

The first argument is a catalog path as `Catalog.iter_sources()` names them (`vae`,
`checkpoints.<id>`, `checkpoints.<id>.config`, `templates.<id>.loras[<n>]`,
`templates.<id>.embeddings[<n>]`, `addons.<name>`) or a source string that
appears in the catalog (its pin and allow_pickle come from there). `--out` places the fetched file
(hard link when possible, else a copy) or folder (symlink) at a path a DVC stage can declare as output.

`--receipt` is what dvc.yaml's fetch-* stages run: it fetches every source of one group (the VAE, one
checkpoint with its config folder, or all LoRAs and embeddings of one template) and writes a small JSON
receipt at `--receipt-out` (stages/receipts.py) naming each source with its sha256, size and kind. The
receipt is the DVC output; the bytes stay in the download cache, so multi-GB files are never copied into the
DVC cache or pushed twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from fuseline.core.catalog.model import Catalog, RecipeCheckpoint, Source
from fuseline.core.errors import ConfigInvalid, FuselineError
from fuseline.core.files import sha256_file
from fuseline.core.logs import setup_logging
from fuseline.core.redact import install_redaction, redact
from fuseline.remote.archive import tree_listing, tree_sha256
from stages.errors import StageError
from stages.local_files import project_archive
from stages.receipts import check_group, write_receipt_file
from stages.runtime import CATALOG_FILE, load_project_catalog, measure_stage
from stages.settings import BuildSettings
from stages.sources.archived import ProjectArchive
from stages.sources.cache import DownloadCache
from stages.sources.download import RetryPolicy
from stages.sources.hf import CONFIG_FOLDER_PATTERNS
from stages.sources.resolve import fetch

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
    catalog: Catalog,
    source_spec: str | Source,
    cache_dir: str | os.PathLike[str] | None,
    policy: RetryPolicy | None = None,
    archive: ProjectArchive | None = None,
) -> Path:
    """The verified local path of one catalog source (downloading it into `cache_dir` if needed; from the
    project's source `archive` when upstream lost it)."""
    source, is_config = find_source(catalog, source_spec)
    return fetch(
        source,
        cache=DownloadCache(cache_dir),
        catalog=catalog,
        allow_patterns=CONFIG_FOLDER_PATTERNS if is_config else None,
        policy=policy,
        archive=archive,
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


def group_sources(catalog: Catalog, group: str) -> list[tuple[str, Source, bool]]:
    """(catalog path, source, is a config folder) for every source a receipt group covers, in catalog
    order. A group that names nothing in the catalog is an error (a typo in dvc.yaml or on the CLI)."""
    check_group(group)
    kind, _, key = group.partition(".")
    if group == "vae":
        return [("vae", catalog.vae, False)] if catalog.vae is not None else []
    if kind == "checkpoints":
        if key not in catalog.checkpoints:
            known = ", ".join(sorted(catalog.checkpoints)) or "(none)"
            raise StageError("CHECKPOINT_UNKNOWN", f"no checkpoint {key!r} in the catalog; known: {known}")
        checkpoint = catalog.checkpoints[key]
        if isinstance(checkpoint, RecipeCheckpoint):
            # A recipe's inputs: the convert stage converts each and merges them.
            found = [
                (f"{group}.recipe.{role}", model, False) for role, model in checkpoint.recipe.inputs().items()
            ]
        else:
            found = [(group, checkpoint, False)]
        if checkpoint.config is not None:
            found.append((f"{group}.config", Source(source=checkpoint.config), True))
        return found
    if key not in catalog.templates:
        known = ", ".join(sorted(catalog.templates)) or "(none)"
        raise StageError("TEMPLATE_UNKNOWN", f"no template {key!r} in the catalog; templates: {known}")
    template = catalog.templates[key]
    return [(f"{group}.loras[{i}]", lora, False) for i, lora in enumerate(template.loras)] + [
        (f"{group}.embeddings[{i}]", embedding, False)
        for i, embedding in enumerate(template.embeddings or ())
    ]


def describe(where: str, source: Source, path: Path, cache: DownloadCache) -> dict[str, Any]:
    """One receipt entry. A file's sha256 is the catalog pin (fetch verified it), its name in the
    download cache (content-addressed), or computed (unpinned file: and hf: files)."""
    if path.is_dir():
        # A content identity for folder sources (diffusers layouts, config folders) that ignores where
        # the folder lies; the source archive names archived folders by it (fuseline/remote/archive.py).
        listing = tree_listing(path)
        sha, size, kind = tree_sha256(listing), sum(e["size"] for e in listing), "folder"
    elif source.sha256:
        sha, size, kind = source.sha256.lower(), path.stat().st_size, "file"
    elif path.parent.parent == cache.root / "sha256":
        sha, size, kind = path.name, path.stat().st_size, "file"
    else:
        sha, size, kind = sha256_file(path), path.stat().st_size, "file"
    return {"where": where, "source": redact(source.source), "kind": kind, "sha256": sha, "size": size}


def write_receipt(
    catalog: Catalog,
    group: str,
    out: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    policy: RetryPolicy | None = None,
    archive: ProjectArchive | None = None,
) -> Path:
    """Fetch every source of `group` into the download cache (from the project's source `archive` when
    upstream lost one) and write its receipt at `out`."""
    cache = DownloadCache(cache_dir)
    entries = []
    for where, source, is_config in group_sources(catalog, group):
        path = fetch(
            source,
            cache=cache,
            catalog=catalog,
            allow_patterns=CONFIG_FOLDER_PATTERNS if is_config else None,
            policy=policy,
            archive=archive,
        )
        entries.append(describe(where, source, path, cache))
        log.info("%s: %s (%s, %d bytes) sha256 %s", where, entries[-1]["source"],
                 entries[-1]["kind"], entries[-1]["size"], entries[-1]["sha256"])  # fmt: skip
    return write_receipt_file(out, group, entries)


def receipt_stage(group: str) -> tuple[str, str]:
    """(dvc.yaml stage, id) that writes `group`'s receipt: its build metrics go under that name."""
    kind, _, key = group.partition(".")
    stages = {"checkpoints": "fetch-checkpoint", "templates": "fetch-loras"}
    return ("fetch-vae", "vae") if group == "vae" else (stages.get(kind, "fetch"), key or group)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    install_redaction()
    try:
        settings = BuildSettings.from_env()
    except ConfigInvalid as exc:
        print(redact(f"error: fetch: {exc}"), file=sys.stderr)
        return 1
    policy = RetryPolicy.from_settings(settings)
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__.split("\n")[0])
    parser.add_argument(
        "source", nargs="?", help="catalog path (checkpoints.<id>, templates.<id>.loras[0], vae) or source"
    )
    parser.add_argument(
        "--receipt",
        metavar="GROUP",
        help="fetch a whole group (vae, checkpoints.<id>, templates.<id>) and write its receipt",
    )
    parser.add_argument("--receipt-out", type=Path, metavar="PATH", help="where --receipt writes the receipt")
    parser.add_argument("--catalog", default=CATALOG_FILE)
    parser.add_argument(
        "--cache", default=None, help="download cache (default: FUSELINE_CACHE_DIR or ~/.cache)"
    )
    parser.add_argument("--out", default=None, help="also place the result here (hard link / symlink)")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.receipt is None):
        parser.error("give either a source or --receipt GROUP")
    if (args.receipt is None) != (args.receipt_out is None):
        parser.error("--receipt GROUP and --receipt-out PATH go together")
    cache_dir = args.cache or settings.download_cache
    if args.receipt is not None:
        try:
            with measure_stage(*receipt_stage(args.receipt)):  # stage.* events, build metrics
                catalog = load_project_catalog(args.catalog)
                archive = project_archive(catalog, settings)
                path = write_receipt(catalog, args.receipt, args.receipt_out, cache_dir, policy, archive)
        except FuselineError as exc:
            # print() does not go through the logging redaction: redact here, as run_stage does.
            print(redact(f"error: fetch --receipt {args.receipt}: {exc}"), file=sys.stderr)
            return 1
        print(path)
        return 0
    try:
        catalog = load_project_catalog(args.catalog)
        path = fetch_source(catalog, args.source, cache_dir, policy, project_archive(catalog, settings))
        if args.out:
            place(path, Path(args.out))
    except FuselineError as exc:
        print(redact(f"error: fetch {args.source}: {exc}"), file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
