"""Add-on LoRAs per job: which add-ons a template offers (the folders sync put under `<volume>/addons/`), a
job's `loras` checked against them, and applying them for one generation on top of the cached pipeline
with diffusers' adapters, removed afterwards (docs/operations.md, "Add-on LoRAs").

Applying: each add-on file is loaded once into the pipeline as a PEFT adapter (`load_lora_weights`) and
kept there, least recently used dropped first beyond FUSELINE_MAX_ADDONS; a job activates its add-ons with
`set_adapters` at its scales, and afterwards the pipeline is put back exactly as it was: adapters disabled
for a merged model (PEFT's layers then return their base layer's output untouched, so the next job without
add-ons gets the template bit for bit), or the template's own adapters alone for a runtime-LoRA fallback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fuseline.core.logs import log_event
from fuseline.core.manifest import ADDON_LORA_NAME, AddonManifest, ManifestError
from worker.adapters import check_lora_file, load_adapter, peft_name
from worker.errors import InvalidInput, ModelInvalid
from worker.inputs import LoraRequest
from worker.pipelines import LoadedTemplate
from worker.settings import WorkerSettings
from worker.sync.volume import ADDONS_FOLDER, Lease, Volume

log = logging.getLogger("fuseline.worker.addons")


@dataclass(frozen=True)
class Addon:
    """An add-on folder on the volume and what its addon.json says."""

    name: str
    manifest: AddonManifest

    def offered_with(self, template_id: str) -> bool:
        return self.manifest.templates is None or template_id in self.manifest.templates

    @property
    def adapter(self) -> str:
        """Its PEFT adapter name: the content hash in it, so a re-synced file is a new adapter."""
        return f"addon_{peft_name(self.name)}_{self.manifest.sha256[:12]}"


@dataclass(frozen=True)
class AppliedAddon:
    addon: Addon
    scale: float

    def public(self) -> dict[str, float | str]:
        return {"name": self.addon.name, "scale": self.scale}


def volume_addons(settings: WorkerSettings) -> tuple[dict[str, Addon], dict[str, str]]:
    """(the add-ons on the volume by name, the folders there that are not usable add-ons -> why).
    Reads small JSON files only."""
    found: dict[str, Addon] = {}
    broken: dict[str, str] = {}
    if not settings.addons_dir.is_dir():
        return found, broken
    for folder in sorted(settings.addons_dir.iterdir()):
        if folder.name.startswith("."):
            continue  # sync's versions and bookkeeping (worker/sync/volume.py)
        try:
            manifest = AddonManifest.read(folder)
        except ManifestError as exc:
            broken[folder.name] = exc.message
            continue
        if manifest.name != folder.name:
            broken[folder.name] = f"{folder}/addon.json names add-on {manifest.name!r}; re-sync it"
            continue
        found[folder.name] = Addon(folder.name, manifest)
    return found, broken


def offered_addons(settings: WorkerSettings, template_id: str) -> dict[str, Addon]:
    """The add-ons a job on `template_id` may ask for, by name."""
    addons, _ = volume_addons(settings)
    return {name: addon for name, addon in addons.items() if addon.offered_with(template_id)}


def resolve_addons(
    settings: WorkerSettings, template_id: str, requested: Sequence[LoraRequest] | None
) -> list[AppliedAddon]:
    """The job's `loras`, each a known add-on of the template at an allowed scale (absent: its default);
    InvalidInput naming every problem at once."""
    if not requested:
        return []
    offered = offered_addons(settings, template_id)
    choices = ", ".join(sorted(offered)) or "none"
    problems: list[str] = []
    applied: list[AppliedAddon] = []
    for index, lora in enumerate(requested):
        addon = offered.get(lora.name)
        if addon is None:
            problems.append(
                f"loras.{index}.name: unknown add-on {lora.name!r} for template {template_id!r}; "
                f"its add-ons: {choices}"
            )
            continue
        rules = addon.manifest
        scale = rules.default_scale if lora.scale is None else lora.scale
        if not rules.min_scale <= scale <= rules.max_scale:
            problems.append(
                f"loras.{index}.scale: {scale:g} is outside {rules.min_scale:g}..{rules.max_scale:g}, the "
                f"range of add-on {lora.name!r} (got {scale!r})"
            )
            continue
        applied.append(AppliedAddon(addon, float(scale)))
    if problems:
        raise InvalidInput(f"{len(problems)} problem(s): " + "; ".join(problems))
    return applied


# ------------------------------------------------------------------------------------------ applying


def _load(settings: WorkerSettings, entry: LoadedTemplate, addon: Addon) -> None:
    """Load `addon`'s file into the entry's pipeline as its adapter, from the version folder (leased while
    reading, so a sync switching versions does not delete it underneath), its sha256 checked first."""
    link = settings.addons_dir / addon.name
    lease = Lease(Volume(settings.volume, ADDONS_FOLDER), addon.name) if link.is_symlink() else None
    folder = link
    if lease is not None:
        try:
            folder = lease.acquire()
        except (OSError, RuntimeError) as exc:
            raise ModelInvalid(f"add-on {addon.name!r}: cannot lease {link}: {exc}") from None
    try:
        manifest = AddonManifest.read(folder)
        if manifest.sha256 != addon.manifest.sha256:
            raise ModelInvalid(f"add-on {addon.name!r}: {link} changed while loading; retry the job")
        path = folder / ADDON_LORA_NAME
        check_lora_file(path, manifest.source, manifest.sha256, "its addon.json promises; re-sync the add-on")
        load_adapter(entry.pipe, path, addon.adapter, manifest.source, f"template {entry.template_id!r}")
    except ManifestError as exc:
        raise ModelInvalid(f"add-on {addon.name!r}: {exc.message}") from None
    finally:
        if lease is not None:
            lease.release()


def _make_room(entry: LoadedTemplate, keep: set[str], limit: int) -> None:
    """Delete least recently used add-on adapters not in `keep` until at most `limit` are loaded."""
    for adapter in list(entry.addon_adapters):
        if len(entry.addon_adapters) <= limit:
            return
        if adapter not in keep:
            entry.pipe.delete_adapters(adapter)
            del entry.addon_adapters[adapter]


def _set_adapters(entry: LoadedTemplate, applied: Sequence[AppliedAddon]) -> None:
    names = [name for name, _ in entry.base_adapters] + [a.addon.adapter for a in applied]
    weights = [weight for _, weight in entry.base_adapters] + [a.scale for a in applied]
    entry.pipe.enable_lora()
    entry.pipe.set_adapters(names, adapter_weights=weights)


def restore(entry: LoadedTemplate) -> None:
    """The pipeline as the template has it: the template's own adapters alone (a runtime-LoRA fallback),
    or every adapter layer disabled (a merged model: each PEFT layer returns its base layer's output)."""
    if entry.base_adapters:
        _set_adapters(entry, ())
    elif entry.addon_adapters:
        entry.pipe.disable_lora()


@contextlib.contextmanager
def _plain_unet(pipe) -> Iterator[None]:
    """diffusers' adapter calls (set_adapters, enable_lora, disable_lora, delete_adapters) act on a component
    only when it is a diffusers model; a torch.compile'd UNet (FUSELINE_SPEED=compile) is a wrapper around
    one, which they would skip without a word. So they see the UNet itself; the compiled wrapper, which
    runs the same modules, is put back for the generation."""
    compiled = pipe.unet
    original = getattr(compiled, "_orig_mod", None)
    if original is None:
        yield
        return
    pipe.unet = original
    try:
        yield
    finally:
        pipe.unet = compiled


@contextlib.contextmanager
def addons_applied(
    settings: WorkerSettings, entry: LoadedTemplate, applied: Sequence[AppliedAddon]
) -> Iterator[None]:
    """Within the block, `entry`'s pipeline carries the template plus `applied` at their scales; after it
    (also on an error) the template alone again."""
    if not applied:
        yield
        return
    # FUSELINE_SPEED=fuse_qkv concatenates to_q/to_k/to_v into one projection the LoRA layers on them are
    # not part of: unfused for the job, fused again afterwards (the speed options skip fallback pipelines).
    fused = "fuse_qkv" in settings.speed.options and not entry.degraded
    try:
        with _plain_unet(entry.pipe):
            _activate(settings, entry, applied, fused)
        yield
    finally:
        with _plain_unet(entry.pipe):
            restore(entry)
            if fused:
                entry.pipe.unet.fuse_qkv_projections()


def _activate(
    settings: WorkerSettings, entry: LoadedTemplate, applied: Sequence[AppliedAddon], fused: bool
) -> None:
    """Load the add-ons not loaded yet (making room in the LRU), then set the job's adapters."""
    wanted = {a.addon.adapter for a in applied}
    if fused:
        entry.pipe.unet.unfuse_qkv_projections()
    for item in applied:
        addon = item.addon
        if addon.adapter in entry.addon_adapters:
            entry.addon_adapters.move_to_end(addon.adapter)
            continue
        # Another version of this add-on (an older sync) is dropped: it will not be asked for again.
        for stale in [a for a, name in entry.addon_adapters.items() if name == addon.name]:
            entry.pipe.delete_adapters(stale)
            del entry.addon_adapters[stale]
        _make_room(entry, wanted, max(settings.max_addons - 1, len(wanted) - 1))
        try:
            _load(settings, entry, addon)
        except BaseException:
            # diffusers may have injected layers before failing: leave no half-loaded adapter behind.
            with contextlib.suppress(Exception):
                entry.pipe.delete_adapters(addon.adapter)
            raise
        entry.addon_adapters[addon.adapter] = addon.name
        log_event(
            log,
            "addon.loaded",
            f"add-on {addon.name} loaded into template {entry.template_id}",
            template=entry.template_id,
            addon=addon.name,
            loaded=list(entry.addon_adapters.values()),
        )
    _set_adapters(entry, applied)
