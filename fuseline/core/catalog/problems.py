"""Catalog problems: one located finding (file, JSON path, message, fix), and the error carrying them all."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic_core import PydanticCustomError

from fuseline.core.errors import FuselineError
from fuseline.core.redact import redact


@dataclass(frozen=True)
class Problem:
    """One thing wrong with (or worth knowing about) a catalog, located by file and JSON path. `code` is
    stable and upper-case (`CHECKPOINT_UNKNOWN`, pydantic's own kinds such as `GREATER_THAN_EQUAL`)."""

    file: str
    path: str
    message: str
    hint: str = ""
    severity: Literal["error", "warning"] = "error"
    code: str = ""

    def __post_init__(self) -> None:
        # pydantic names its error kinds in lower case; ours are upper case like every other code.
        object.__setattr__(self, "code", self.code.upper())
        # A problem quotes what the catalog says, and a catalog may hold a credential by mistake (a
        # user:password@ source): every problem is printed, so none carries one.
        object.__setattr__(self, "message", redact(self.message))
        object.__setattr__(self, "hint", redact(self.hint))

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}: " if self.path else f"{self.file}: "
        kind = "warning: " if self.severity == "warning" else ""
        fix = f" (fix: {self.hint})" if self.hint else ""
        return f"{where}{kind}{self.message}{fix}"


class CatalogError(FuselineError):
    """A catalog that cannot be used. `problems` holds every error found (and the warnings), not just the
    first, so one run of `fuseline validate` shows everything to fix."""

    code = "CATALOG_INVALID"

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return self.message

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def fail(code: str, message: str, hint: str = "", at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """An error of ours for pydantic to collect. `at` extends the location pydantic reports (a model
    validator is located at its model; the problem is at one of its fields)."""
    # The message travels in the context so that braces in it are never taken for a template.
    return PydanticCustomError(code, "{message}", {"message": message, "hint": hint, "at": at})


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def format_path(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """`("templates", "cinematic", "loras", 1, "scale")` -> `templates.cinematic.loras[1].scale`.
    Keys that would be ambiguous in dotted form (dots, spaces, empty) are quoted: `templates["a.b"]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


def show_value(value: Any) -> str:
    """A short JSON rendering of a value for messages (NaN and Infinity shown as such)."""
    try:
        text = json.dumps(value, allow_nan=True, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
