"""Civitai `baseModel` values by model family (tables only; the check lives in civitai.py).

Values as Civitai's API spells them. "Pony V7" is deliberately absent: it is AuraFlow-based, not SDXL.
A value in no table is refused too (it may be a new architecture); add it here once checked.
"""

from __future__ import annotations

FAMILIES: dict[str, frozenset[str]] = {
    "sdxl": frozenset(
        {
            "SDXL 0.9",
            "SDXL 1.0",
            "SDXL 1.0 LCM",
            "SDXL Distilled",
            "SDXL Turbo",
            "SDXL Lightning",
            "SDXL Hyper",
            "Pony",
            "Illustrious",
            "NoobAI",
        }
    ),
    "sd1": frozenset({"SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"}),
    "sd2": frozenset({"SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"}),
    "sd3": frozenset({"SD 3", "SD 3.5", "SD 3.5 Medium", "SD 3.5 Large", "SD 3.5 Large Turbo"}),
    "flux": frozenset({"Flux.1 S", "Flux.1 D", "Flux.1 Kontext"}),
    "other": frozenset(
        {
            "Pony V7",
            "AuraFlow",
            "Stable Cascade",
            "SVD",
            "SVD XT",
            "PixArt a",
            "PixArt E",
            "Hunyuan 1",
            "Kolors",
            "Lumina",
            "HiDream",
            "Wan Video",
            "Playground v2",
            "Other",
        }
    ),
}


def family_of(base_model: str | None) -> str | None:
    """The family a Civitai baseModel belongs to, or None when no table lists it."""
    for family, names in FAMILIES.items():
        if base_model in names:
            return family
    return None
