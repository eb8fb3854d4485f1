"""Reading templates.json: JSON with duplicate keys noticed, pydantic's errors turned into located problems
with a fix, the checks that span entries, warnings, and every problem reported at once in file order."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fuseline.core import serving
from fuseline.core.catalog.model import (
    CATALOG_VERSION,
    RECIPE_CHECKPOINT_TAG,
    SOURCE_CHECKPOINT_TAG,
    AddonSpec,
    Catalog,
    Checkpoint,
    Defaults,
    EmbeddingSpec,
    LoraSpec,
    Recipe,
    RecipeCheckpoint,
    RecipeInput,
    RefinerOptions,
    Template,
    VaeSpec,
    addon_pickle_error,
    checkpoint_role_errors,
    pickle_error,
    refiner_missing,
    serving_errors,
    unknown_addon_template,
    unknown_checkpoint,
)
from fuseline.core.catalog.problems import CatalogError, Problem, format_path, show_value
from fuseline.core.catalog.sources import SOURCE_FORMS, SourceStringError, parse_source


class _JsonObject(dict):
    """A parsed JSON object that remembers which keys appeared more than once (json keeps the last)."""

    duplicates: list[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _duplicate_problems(node: Any, loc: tuple[str | int, ...], file: str) -> Iterator[Problem]:
    if isinstance(node, dict):
        for key in getattr(node, "duplicates", []):
            yield Problem(
                file,
                format_path((*loc, key)),
                f"key {key!r} appears more than once in this object; JSON keeps only the last one",
                "remove or rename the duplicate (two templates or checkpoints need two different ids)",
                code="DUPLICATE_KEY",
            )
        for key, value in node.items():
            yield from _duplicate_problems(value, (*loc, key), file)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _duplicate_problems(value, (*loc, index), file)


# What each field must be, and how to fix it, for translating pydantic's type and range errors.
_FIELD_RULES: dict[str, tuple[str, str]] = {
    "version": ("the number 1", 'set "version": 1'),
    "vae": (
        'an object like {"source": "hf:madebyollin/sdxl-vae-fp16-fix@<revision>"} (the fp16-fix VAE)',
        'write "vae": {"source": "hf:madebyollin/sdxl-vae-fp16-fix@<revision>"}',
    ),
    "checkpoints": (
        "an object mapping checkpoint ids to checkpoints",
        'write "checkpoints": {"<id>": {...}}',
    ),
    "templates": ("an object mapping template ids to templates", 'write "templates": {"<id>": {...}}'),
    "source": ("a source string", f"write one of {SOURCE_FORMS}"),
    "sha256": ("a string of 64 hex digits", "paste the file's full SHA-256"),
    "allow_pickle": ("true or false", "write true or false, without quotes"),
    "prediction": ('"epsilon" or "v_prediction"', 'use "epsilon" unless the model card says v-prediction'),
    "config": ("a source string naming a config folder", "use hf:<org>/<repo>@<revision> or file:<folder>"),
    "scale": (
        "a finite number from -4 to 4",
        "use a number such as 0.8 (NaN, Infinity and true are not numbers)",
    ),
    "checkpoint": ("a checkpoint id (a string)", "name one of the ids under checkpoints"),
    "loras": ("a list of LoRA objects", 'write "loras": [{"source": "...", "scale": 1.0}]'),
    "defaults": ("an object of generation defaults", 'write "defaults": {"steps": 24, ...}'),
    "steps": ("an integer from 1 to 150", "use a whole number such as 24"),
    "guidance_scale": ("a finite number from 0 to 30", "use a number such as 4.5"),
    "width": ("a multiple of 8 from 256 to 2048", "use a value such as 1024 (SDXL works in 8-pixel latents)"),
    "height": (
        "a multiple of 8 from 256 to 2048",
        "use a value such as 1024 (SDXL works in 8-pixel latents)",
    ),
    "negative_prompt": ("a string", 'write "" for none'),
    "scheduler": ("a scheduler name (a string)", "remove it to use the export's scheduler"),
    "timestep_spacing": ('"leading", "linspace" or "trailing"', 'use "trailing" for few-step models'),
    "karras_sigmas": ("true or false", "write true or false, without quotes"),
    "refiner": (
        "a checkpoint id (a string) in a template, an object in defaults",
        'name the refiner\'s checkpoint id in the template, and write "refiner": {"switch_at": 0.8} in '
        "its defaults",
    ),
    "switch_at": ("a number above 0 and at most 1", "use a number such as 0.8"),
    "recipe": (
        "an object",
        'write "recipe": {"method": "weighted_sum", "a": {...}, "b": {...}, "alpha": 0.5}',
    ),
    "method": ('"weighted_sum" or "add_difference"', 'use "weighted_sum" or "add_difference"'),
    "a": ("a source object", 'write {"source": "...", "sha256": "..."}'),
    "b": ("a source object", 'write {"source": "...", "sha256": "..."}'),
    "c": ("a source object", 'write {"source": "...", "sha256": "..."}'),
    "alpha": ("a finite number", "use a number such as 0.5"),
    "clip_skip": ("a whole number from 1 to 12", "use 2 (SDXL's own layer) or remove it"),
    "embeddings": (
        "a list of embedding objects",
        'write "embeddings": [{"source": "...", "token": "negativeXL_D"}]',
    ),
    "token": ("a string", 'write the word prompts use, e.g. "negativeXL_D"'),
    "addons": (
        "an object mapping add-on names to add-ons",
        'write "addons": {"<name>": {"source": "...", "max_scale": 1.0}}',
    ),
    "default_scale": ("a finite number from -4 to 4", "use a number such as 0.8"),
    "min_scale": ("a finite number from -4 to 4", "use a number such as 0"),
    "max_scale": ("a finite number from -4 to 4", "use a number such as 1.2"),
}
# Keys whose rule differs under addons.<name> (an add-on's `templates` is a list of ids).
_ADDON_FIELD_RULES: dict[str, tuple[str, str]] = {
    "templates": ("a list of template ids", 'write "templates": ["<template id>", ...] or remove it'),
}

_CHECKPOINT_TAGS = {SOURCE_CHECKPOINT_TAG: Checkpoint, RECIPE_CHECKPOINT_TAG: RecipeCheckpoint}


def _untagged(loc: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], type[BaseModel] | None]:
    """(`loc` without the checkpoint union's tag, the checkpoint model the tag names): pydantic reports a
    tagged union's errors under the tag, which is no key of the file."""
    if len(loc) >= 3 and loc[0] == "checkpoints" and loc[2] in _CHECKPOINT_TAGS:
        return (*loc[:2], *loc[3:]), _CHECKPOINT_TAGS[loc[2]]  # type: ignore[index]
    return loc, None


def _model_at(
    loc: tuple[str | int, ...], checkpoint: type[BaseModel] | None = None
) -> type[BaseModel] | None:
    """The model class that validates the object at `loc` (to list its valid keys); `checkpoint`: which
    kind of checkpoint entry the loc is in."""
    if loc == ():
        return Catalog
    if loc == ("vae",):
        return VaeSpec
    if len(loc) == 2 and loc[0] == "checkpoints":
        return checkpoint or Checkpoint
    if len(loc) == 3 and loc[0] == "checkpoints" and loc[2] == "recipe":
        return Recipe
    if len(loc) == 4 and loc[0] == "checkpoints" and loc[2] == "recipe":
        return RecipeInput
    if len(loc) == 3 and loc[0] == "templates" and loc[2] == "defaults":
        return Defaults
    if len(loc) == 4 and loc[0] == "templates" and loc[2:] == ("defaults", "refiner"):
        return RefinerOptions
    if len(loc) == 2 and loc[0] == "templates":
        return Template
    if len(loc) == 4 and loc[0] == "templates" and loc[2] == "loras":
        return LoraSpec
    if len(loc) == 4 and loc[0] == "templates" and loc[2] == "embeddings":
        return EmbeddingSpec
    if len(loc) == 2 and loc[0] == "addons":
        return AddonSpec
    return None


def _translate(error: dict[str, Any], file: str) -> Problem:
    """Turn one pydantic error into a Problem with a JSON path, a plain message and a fix."""
    kind = error["type"]
    loc, checkpoint_model = _untagged(tuple(error["loc"]))
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if "message" in ctx:  # one of ours
        if loc and loc[-1] == "[key]":  # a bad dict key: point at the key itself
            loc = loc[:-1]
        loc = (*loc, *ctx.get("at", ()))
        return Problem(file, format_path(loc), ctx["message"], ctx.get("hint", ""), code=kind)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc[:-1], checkpoint_model)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hint += f"valid keys here: {', '.join(valid)}" if valid else "remove it"
        return Problem(file, format_path(loc), f"unknown key {key!r}", hint, code="UNKNOWN_KEY")
    if kind == "missing":
        key = str(loc[-1])
        if key == "version":
            hint = 'add "version": 1 at the top of the file'
        elif key in _FIELD_RULES:
            hint = f"add {key!r}: {_FIELD_RULES[key][0]}"
        else:
            hint = f"add {key!r}"
        return Problem(file, format_path(loc), f"required key {key!r} is missing", hint, code="MISSING_KEY")
    if kind in ("model_type", "model_attributes_type", "dict_type") and (
        not loc or not isinstance(loc[-1], str) or loc[-1] not in _FIELD_RULES
    ):
        what = "the catalog" if not loc else "this entry"
        return Problem(
            file,
            format_path(loc),
            f"{what} must be a JSON object, got {show_value(value)}",
            "write it as {...}",
            code="NOT_AN_OBJECT",
        )
    if kind == "literal_error" and loc == ("version",):
        return Problem(
            file,
            "version",
            f"unsupported catalog version {show_value(value)}; this fuseline reads version {CATALOG_VERSION}",
            f'set "version": {CATALOG_VERSION} (or upgrade fuseline if the file was written for a newer one)',
            code="VERSION_UNSUPPORTED",
        )
    if kind == "too_short" and loc == ("templates",):
        return Problem(
            file,
            "templates",
            "templates is empty; there is nothing to build",
            'add at least one template: "templates": {"<id>": {"checkpoint": "<checkpoint id>"}}',
            code="TEMPLATES_EMPTY",
        )
    field = next((part for part in reversed(loc) if isinstance(part, str)), "")
    rules = (
        {**_FIELD_RULES, **_ADDON_FIELD_RULES} if loc[:1] == ("addons",) and len(loc) > 2 else _FIELD_RULES
    )
    if field in rules:
        rule, hint = rules[field]
        return Problem(
            file, format_path(loc), f"{field} must be {rule}, got {show_value(value)}", hint, code=kind
        )
    return Problem(
        file, format_path(loc), f"invalid value {show_value(value)}", "see docs/templates.md", code=kind
    )


def _raw_sources(data: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:
    if isinstance(data.get("vae"), dict):
        yield ("vae",), data["vae"]
    if isinstance(data.get("checkpoints"), dict):
        for key, value in data["checkpoints"].items():
            if isinstance(value, dict) and isinstance(value.get("recipe"), dict):
                for role in ("a", "b", "c"):
                    if isinstance(value["recipe"].get(role), dict):
                        yield ("checkpoints", key, "recipe", role), value["recipe"][role]
            elif isinstance(value, dict):
                yield ("checkpoints", key), value
    if isinstance(data.get("templates"), dict):
        for key, template in data["templates"].items():
            for kind in ("loras", "embeddings"):
                if isinstance(template, dict) and isinstance(template.get(kind), list):
                    for index, value in enumerate(template[kind]):
                        if isinstance(value, dict):
                            yield ("templates", key, kind, index), value
    if isinstance(data.get("addons"), dict):
        for key, value in data["addons"].items():
            if isinstance(value, dict):
                yield ("addons", key), value


def _cross_field_problems(data: dict[str, Any], file: str) -> Iterator[Problem]:
    """Checks that span fields, run on the raw data so that they are reported even when other parts of
    the catalog fail validation (pydantic runs a model's own cross-field check only when its fields are
    valid). The model runs the same checks, so a catalog built in code gets them too."""
    for loc, obj in _raw_sources(data):
        source = obj.get("source")
        try:
            pickle = isinstance(source, str) and parse_source(source).is_pickle
        except SourceStringError:
            pickle = False
        addon = loc[:1] == ("addons",)
        if (pickle and obj.get("allow_pickle") is not True) or (
            addon and (pickle or obj.get("allow_pickle"))
        ):
            err = addon_pickle_error(source) if addon else pickle_error(source)
            yield Problem(
                file,
                format_path((*loc, "source")),
                err.context["message"],
                err.context["hint"],
                code=err.type,
            )
    templates = data.get("templates")
    for template_id, template in templates.items() if isinstance(templates, dict) else ():
        defaults = template.get("defaults") if isinstance(template, dict) else None
        for err in serving_errors(defaults) if isinstance(defaults, dict) else ():
            loc = ("templates", template_id, "defaults", *err.context["at"])
            yield Problem(file, format_path(loc), err.context["message"], err.context["hint"], code=err.type)
        if (
            isinstance(defaults, dict)
            and defaults.get("refiner") is not None
            and template.get("refiner") is None
        ):
            err = refiner_missing()
            loc = ("templates", template_id, *err.context["at"])
            yield Problem(file, format_path(loc), err.context["message"], err.context["hint"], code=err.type)
    addons = data.get("addons")
    for addon_id, addon in addons.items() if isinstance(addons, dict) and isinstance(templates, dict) else ():
        named = addon.get("templates") if isinstance(addon, dict) else None
        for index, name in enumerate(named) if isinstance(named, list) else ():
            if isinstance(name, str) and name not in templates:
                err = unknown_addon_template(addon_id, index, name, list(templates))
                loc = ("addons", addon_id, "templates", index)
                yield Problem(
                    file, format_path(loc), err.context["message"], err.context["hint"], code=err.type
                )
    checkpoints = data.get("checkpoints")
    if not isinstance(checkpoints, dict) or not isinstance(templates, dict):
        return
    roles = {
        template_id: (template.get("checkpoint"), template.get("refiner"))
        for template_id, template in templates.items()
        if isinstance(template, dict)
    }
    recipes = {key: isinstance(value, dict) and "recipe" in value for key, value in checkpoints.items()}
    for err in checkpoint_role_errors(roles, recipes):
        loc = err.context["at"]
        yield Problem(file, format_path(loc), err.context["message"], err.context["hint"], code=err.type)
    for template_id, template in templates.items():
        if isinstance(template, dict) and isinstance(template.get("checkpoint"), str):
            name = template["checkpoint"]
            if name not in checkpoints:
                err = unknown_checkpoint(template_id, name, list(checkpoints))
                yield Problem(
                    file,
                    format_path(("templates", template_id, "checkpoint")),
                    err.context["message"],
                    err.context["hint"],
                    code=err.type,
                )


def _warning_problems(catalog: Catalog, file: str, check_files: bool) -> Iterator[Problem]:
    used = {template.checkpoint for template in catalog.templates.values()} | set(catalog.refiners())
    for checkpoint_id in catalog.checkpoints:
        if checkpoint_id not in used:
            yield Problem(
                file,
                format_path(("checkpoints", checkpoint_id)),
                f"checkpoint {checkpoint_id!r} is not used by any template (dvc repro still converts it)",
                'remove it, or name it in a template\'s "checkpoint"',
                "warning",
                "CHECKPOINT_UNUSED",
            )
    for template_id, template in catalog.templates.items():
        width, height = template.defaults.width, template.defaults.height
        if width * height > serving.DEFAULT_MAX_PIXELS:
            # A warning, not an error: a worker's FUSELINE_MAX_PIXELS may raise its budget.
            yield Problem(
                file,
                format_path(("templates", template_id, "defaults")),
                f"{width}x{height} = {width * height} pixels exceeds the worker's default budget of "
                f"{serving.DEFAULT_MAX_PIXELS}: jobs relying on these defaults fail unless the worker's "
                "FUSELINE_MAX_PIXELS allows them",
                "use a smaller default width and height, or raise FUSELINE_MAX_PIXELS on the endpoint",
                "warning",
                "PIXELS_OVER_BUDGET",
            )
    for path, source in catalog.iter_sources():
        parsed = source.parsed
        if parsed.scheme in ("civitai", "https", "s3") and source.sha256 is None:
            yield Problem(
                file,
                f"{path}.sha256",
                f"{parsed.scheme} source {source.source!r} has no sha256: a changed upload goes unnoticed",
                'add "sha256": "<64 hex digits>" (sha256sum FILE)',
                "warning",
                "SHA256_MISSING",
            )
        if check_files and parsed.scheme == "file" and not catalog.resolve_file(parsed).exists():
            yield Problem(
                file,
                f"{path}.source",
                f"{source.source!r} does not exist ({catalog.resolve_file(parsed)})",
                "file: paths are relative to the catalog's folder; fix the path or create the file",
                "warning",
                "FILE_MISSING",
            )


_LAST_STEP = re.compile(r"(\.[^.\[]+|\[[^\]]*\])$")


def _in_document_order(problems: list[Problem], data: Any) -> list[Problem]:
    """Sort problems the way their places appear in the file, so the report reads top to bottom (a
    problem about a key that is not in the file, e.g. a missing one, sorts with its parent)."""
    order: dict[str, int] = {}

    def walk(node: Any, loc: tuple[str | int, ...]) -> None:
        order.setdefault(format_path(loc), len(order))
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*loc, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*loc, index))

    walk(data, ())

    def position(problem: Problem) -> int:
        path = problem.path
        while path not in order and path:
            parent = _LAST_STEP.sub("", path)
            path = parent if parent != path else ""  # a top-level key: its parent is the root
        return order.get(path, 0)

    return sorted(problems, key=position)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for problem in problems:
        key = (problem.path, problem.code, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


# A catalog nests 6 levels deep (templates.<id>.loras[<n>].block_weights[<i>]); the walks over the document
# below recurse per level, so anything far deeper is refused before them (and json.loads itself raises
# RecursionError near Python's limit of 1000).
MAX_DEPTH = 32


def _depth(data: Any) -> int:
    """How deep JSON `data` nests (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth + 1)
            if depth + 1 <= MAX_DEPTH:
                stack.extend(
                    (child, depth + 1) for child in (node.values() if isinstance(node, dict) else node)
                )
    return deepest


def _too_deep(file: str) -> CatalogError:
    return CatalogError(
        [
            Problem(
                file,
                "",
                f"JSON nested more than {MAX_DEPTH} levels deep; a catalog nests 6 at most",
                "fix the brackets (see docs/templates.md for the catalog's shape)",
                code="NESTED_TOO_DEEP",
            )
        ]
    )


def _parse(text: str, file: str, path: Path | None) -> Catalog:
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except RecursionError:
        raise _too_deep(file) from None
    except json.JSONDecodeError as exc:
        raise CatalogError(
            [
                Problem(
                    file,
                    "",
                    f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                    "fix the JSON syntax there (usually a missing comma or quote, or a trailing comma)",
                    code="INVALID_JSON",
                )
            ]
        ) from None
    if _depth(data) > MAX_DEPTH:
        raise _too_deep(file)
    problems = list(_duplicate_problems(data, (), file))
    catalog: Catalog | None = None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        problems.extend(_translate(error, file) for error in exc.errors())
    if isinstance(data, dict):
        problems.extend(_cross_field_problems(data, file))
    if catalog is not None:
        catalog._path = path
        problems.extend(_warning_problems(catalog, file, check_files=path is not None))
    problems = _in_document_order(_dedupe(problems), data)
    if catalog is None or any(p.severity == "error" for p in problems):
        raise CatalogError(problems)
    catalog._warnings = problems
    return catalog


def parse_catalog(text: str, file: str = "templates.json") -> Catalog:
    """Parse and validate catalog text; `file` names it in problems. Raises CatalogError with every
    problem found; warnings end up on `catalog.warnings`."""
    return _parse(text, file, None)


def load_catalog(path: str | Path) -> Catalog:
    """Read, parse and validate a templates.json. Raises CatalogError with every problem found."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(
            [
                Problem(
                    file,
                    "",
                    "file not found",
                    "create it (see docs/templates.md) or pass its path",
                    code="NOT_FOUND",
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(
            [Problem(file, "", f"cannot read the file: {exc}", "save it as UTF-8 text", code="UNREADABLE")]
        ) from None
    return _parse(text, file, path.absolute())
