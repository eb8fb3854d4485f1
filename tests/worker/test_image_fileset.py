"""The worker image's file set: the files the Dockerfile copies from the build context that .dockerignore
lets through, laid out as in the image, must be enough to import every worker entry point and module in a
clean interpreter (no repo on the path, no editable install). A module the worker imports that the
Dockerfile forgets fails here, long before anyone builds an image.

The Dockerfile is read with dockerfile-parse and .dockerignore with docker-py's own matcher (the rules
`docker build` applies), so the test sees the build context the way the builder does.
"""

from __future__ import annotations

import ast
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path, PurePosixPath

import pytest
from docker.utils.build import exclude_paths
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
# What RunPod starts (the image's CMD) and what operators run by hand (docs/operations.md).
ENTRY_POINTS = ("worker.handler", "worker.sync", "worker.fallback")


def build_context(root: Path) -> set[str]:
    """Relative paths of the files `docker build` would send from `root`, after .dockerignore."""
    patterns = []
    ignore = root / ".dockerignore"
    if ignore.exists():
        patterns = [line.strip() for line in ignore.read_text().splitlines()]
        patterns = [line for line in patterns if line and not line.startswith("#")]
    return {path for path in exclude_paths(str(root), patterns) if (root / path).is_file()}


def image_files(root: Path) -> dict[str, str]:
    """Map of image path -> context path for every file the Dockerfile COPYs from the build context
    (multi-stage `COPY --from` copies are not from the context and are skipped)."""
    parser = DockerfileParser(path=str(root / "Dockerfile"))
    context = build_context(root)
    workdir = PurePosixPath("/")
    placed: dict[str, str] = {}
    for instruction in parser.structure:
        name, value = instruction["instruction"], instruction["value"]
        if name == "WORKDIR":
            workdir = workdir / value
        if name not in ("COPY", "ADD"):
            continue
        words = [word for word in shlex.split(value) if not word.startswith("--")]
        if any(word.startswith("--from") for word in shlex.split(value)):
            continue
        *sources, destination = words
        target = workdir / destination
        for source in sources:
            source = source.rstrip("/")
            matched = sorted(path for path in context if path == source or path.startswith(source + "/"))
            assert matched, f"Dockerfile: COPY {source} matches no file of the build context (.dockerignore?)"
            for path in matched:
                if path == source and not destination.endswith("/") and len(sources) == 1:
                    placed[str(target)] = path
                elif path == source:
                    placed[str(target / PurePosixPath(path).name)] = path
                else:
                    placed[str(target / PurePosixPath(path).relative_to(source))] = path
    return placed


def worker_modules(tree: Path) -> list[str]:
    """Every module of the worker package (`__main__` modules run their command when imported: left out,
    their package's import covers what they import)."""
    return sorted(
        ".".join(path.relative_to(tree).with_suffix("").parts).removesuffix(".__init__")
        for path in (tree / "worker").rglob("*.py")
        if path.name != "__main__.py"
    )


def repo_imports(path: Path) -> set[str]:
    """Every `fuseline`/`worker` module an import in a file needs, in-function (lazy) imports included:
    `import a.b` needs module a.b; `from a.b import c` needs module a.b, and a.b.c too when c is a
    submodule rather than a name defined in the package's __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}:{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("fuseline", "worker")}


def module_file(tree: Path, module: str) -> Path | None:
    """The file that provides `module` (dotted) or `module:name` in the tree, or None."""
    module, _, name = module.partition(":")
    base = tree.joinpath(*module.split("."))
    package = base / "__init__.py"
    if name:
        submodule = module_file(tree, f"{module}.{name}")
        if submodule:
            return submodule
        if package.is_file() and name in package.read_text():
            return package
        return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None
    for candidate in (base.with_suffix(".py"), package):
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def app_tree(tmp_path_factory) -> Path:
    """The image's /app, built from the Dockerfile's COPY lines."""
    root = tmp_path_factory.mktemp("image-root")
    for image_path, context_path in image_files(REPO).items():
        destination = root / image_path.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / context_path, destination)
    app = root / "app"
    assert (app / "worker" / "handler.py").is_file(), "the Dockerfile no longer copies worker/ to /app"
    return app


def test_every_repo_import_of_the_worker_is_in_the_image(app_tree: Path) -> None:
    for path in sorted(app_tree.rglob("*.py")):
        for module in repo_imports(path):
            found = module_file(app_tree, module)
            assert found, f"{path.relative_to(app_tree)} imports {module}: not in the image"


def test_entry_points_import_from_the_image_file_set_alone(app_tree: Path) -> None:
    """Import the entry points and every worker module in an isolated interpreter: `-I -S` ignores the
    environment, the user site and .pth files (so the editable install of this repo cannot leak in);
    site-packages is appended by hand, as the image's venv provides it."""
    modules = [*ENTRY_POINTS, *worker_modules(app_tree)]
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(app_tree)!r}]\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        f"sys.path.append({sysconfig.get_paths()['platlib']!r})\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(app_tree)!r}), (name, module.__file__)\n"
        "print('imported', len(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=app_tree, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("imported")


def test_the_file_set_check_fails_when_a_module_is_missing(tmp_path: Path) -> None:
    """The check above can fail: the same file set without one module the worker imports does not import."""
    shutil.copytree(REPO / "worker", tmp_path / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "fuseline").mkdir()
    for context_path in image_files(REPO).values():
        if context_path.startswith("fuseline/"):
            (tmp_path / context_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / context_path, tmp_path / context_path)
    imported = {m for p in (tmp_path / "worker").rglob("*.py") for m in repo_imports(p)}
    victims = {module_file(tmp_path, m) for m in imported if m.startswith("fuseline.") and ":" not in m}
    victim = sorted(path for path in victims if path and path.name != "__init__.py")[0]
    victim.unlink()
    missing = [m for m in imported if not module_file(tmp_path, m)]
    assert missing, f"removing {victim.relative_to(tmp_path)} went unnoticed"
