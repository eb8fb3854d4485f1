"""Estimate the worker image's Python payload: download and installed size of requirements/worker.lock.

Why hand-written: no Docker engine here, and no packaging tool (pip, uv, pip-size style helpers) sizes
an *installed* environment without downloading every wheel (torch and its CUDA libraries are several
GB). Wheels are zip files whose central directory (at the end of the file) lists every member with
its uncompressed size, so a few HTTP Range reads per wheel give the installed size exactly, bytes
only, before bytecode compilation.

What it does, for linux x86_64 / CPython 3.11 (the image's platform):
- every pin of requirements/worker.lock (uv installs them all, markers are not re-evaluated);
- plus torch's Linux-only dependencies (CUDA libraries, triton), which the CPU-made lock omits but
  PyPI's torch wheel pulls on Linux, resolved transitively from PEP 658 metadata (falling back to
  the wheel's METADATA via Range reads when PyPI has no `.metadata` file). `==` pins are taken as
  pinned; anything else resolves to the newest matching release at query time (marked "newest").
Sizes come from PyPI's JSON simple API (`size`); nothing is cached or written.

Run:  .venv/bin/python tools/estimate_image_size.py [--lock requirements/worker.lock] [--json]
"""

from __future__ import annotations

import argparse
import email.parser
import io
import json
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

SIMPLE = "https://pypi.org/simple/{}/"
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json"
TIMEOUT = (10, 60)  # connect, read (seconds)
RETRIES = 3
MB = 1_000_000

# Marker environment of the image: linux x86_64, CPython 3.11 (uv's managed 3.11).
ENV = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.14",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.11.14",
    "python_version": "3.11",
    "sys_platform": "linux",
}

# Ubuntu 24.04 ships glibc 2.39: manylinux_2_17 .. manylinux_2_39 (and the legacy aliases) install.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
SUPPORTED = list(tags.cpython_tags((3, 11), abis=["cp311", "abi3", "none"], platforms=PLATFORMS)) + list(
    tags.compatible_tags((3, 11), interpreter="cp311", platforms=PLATFORMS)
)
TAG_RANK = {tag: rank for rank, tag in enumerate(SUPPORTED)}  # lower rank = preferred, as pip/uv do

_local = threading.local()


class EstimateError(RuntimeError):
    pass


def session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
        _local.session.headers["User-Agent"] = "fuseline-estimate-image-size/1"
    return _local.session


def get(url: str, headers: dict[str, str] | None = None, ok=(200,)) -> requests.Response:
    last: Exception | None = None
    for _ in range(RETRIES):
        try:
            response = session().get(url, headers=headers or {}, timeout=TIMEOUT)
        except requests.RequestException as exc:  # network blip: retry, then fail with the URL
            last = exc
            continue
        if response.status_code in ok:
            return response
        if response.status_code == 404:
            raise EstimateError(
                f"404 from {url} (no such project or file on PyPI; check the name in the lock)"
            )
        last = EstimateError(f"HTTP {response.status_code} from {url}")
    raise EstimateError(f"GET {url} failed after {RETRIES} tries: {last}")


class HttpRangeFile(io.RawIOBase):
    """Read-only, seekable view of a remote file; every read() is one HTTP Range GET.

    zipfile.ZipFile only reads the end-of-central-directory record and the central directory,
    so opening a 500 MB wheel costs two or three small requests.
    """

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        response = get(self.url, {"Range": f"bytes={self.pos}-{end - 1}"}, ok=(206,))
        data = response.content
        if len(data) != end - self.pos:
            raise EstimateError(f"{self.url}: asked for {end - self.pos} bytes, got {len(data)}")
        self.pos = end
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@dataclass
class Package:
    name: str
    version: str
    origin: str  # "lock", "torch dep (pinned)", "torch dep (newest)"
    wheel: str = ""
    download_bytes: int = 0
    installed_bytes: int = 0
    py_source_bytes: int = 0
    files: int = 0
    requires: list[str] = field(default_factory=list)


def index(name: str) -> dict:
    return get(SIMPLE.format(canonicalize_name(name)), {"Accept": SIMPLE_ACCEPT}).json()


def parse_version(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:  # legacy, non-PEP 440 releases (e.g. "0.1-bulbasaur") cannot match a pin
        return None


def best_wheel(name: str, version: Version, files: list[dict]) -> dict | None:
    best, best_rank = None, None
    for f in files:
        if f.get("yanked") or not f["filename"].endswith(".whl"):
            continue
        try:
            _, wheel_version, _, wheel_tags = parse_wheel_filename(f["filename"])
        except (InvalidWheelFilename, InvalidVersion):  # old uploads with non-PEP 440 names: skip
            continue
        if wheel_version != version:
            continue
        rank = min((TAG_RANK[t] for t in wheel_tags if t in TAG_RANK), default=None)
        if rank is not None and (best_rank is None or rank < best_rank):
            best, best_rank = f, rank
    return best


def choose(req: Requirement) -> tuple[Version, dict, bool]:
    """Newest release matching req with a wheel for the image; (version, file, pinned)."""
    data = index(req.name)
    pinned = len(req.specifier) == 1 and next(iter(req.specifier)).operator in ("==", "===")
    versions = sorted({v for v in map(parse_version, data["versions"]) if v is not None}, reverse=True)
    for version in versions:
        if version not in req.specifier or (version.is_prerelease and not req.specifier.prereleases):
            continue
        wheel = best_wheel(req.name, version, data["files"])
        if wheel:
            return version, wheel, pinned
    raise EstimateError(f"no linux x86_64 / cp311 wheel on PyPI for {req} (sdist-only or wrong platform)")


def metadata_requires(wheel: dict) -> list[str]:
    response = None
    try:
        response = get(wheel["url"] + ".metadata")
        text = response.text
    except EstimateError:  # no PEP 658 file for this upload: read METADATA out of the wheel itself
        with zipfile.ZipFile(HttpRangeFile(wheel["url"], wheel["size"])) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
            text = zf.read(meta).decode()
    return email.parser.Parser().parsestr(text, headersonly=True).get_all("Requires-Dist") or []


def measure(pkg: Package, wheel: dict) -> Package:
    pkg.wheel, pkg.download_bytes = wheel["filename"], int(wheel["size"])
    try:
        with zipfile.ZipFile(HttpRangeFile(wheel["url"], pkg.download_bytes)) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, EstimateError) as exc:
        raise EstimateError(f"cannot read the zip directory of {wheel['url']}: {exc}") from exc
    pkg.files = len(infos)
    pkg.installed_bytes = sum(i.file_size for i in infos)
    pkg.py_source_bytes = sum(i.file_size for i in infos if i.filename.endswith(".py"))
    return pkg


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        if len(spec) != 1 or spec[0].operator != "==":
            raise EstimateError(
                f"{path}:{number}: expected `name==version`, got {line!r}; regenerate the lock"
            )
        pins[canonicalize_name(req.name)] = spec[0].version
    if "torch" not in pins:
        raise EstimateError(f"{path}: no torch pin; this estimate assumes the lock pins torch")
    return pins


def active(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**ENV, "extra": e}) for e in (extras or {""}))


def resolve_torch_extras(pins: dict[str, str], torch_wheel: dict, notes: list[str]) -> dict[str, Package]:
    """Resolve torch's Linux dependencies that the lock does not pin, transitively.

    A tiny resolver, enough for this graph: walk the requirements, pick the newest release that
    satisfies every constraint seen so far (as uv does), and start over whenever a later constraint
    rules out an earlier pick (e.g. nvidia-cudnn asks for any nvidia-cublas, cuda-toolkit[cublas]
    pins 13.1.1.3.*). Lock pins are fixed; a lock pin that violates a requirement is reported.
    """
    constraints: dict[str, SpecifierSet] = {}
    for _ in range(50):
        added, wheels, restart = _walk(pins, torch_wheel, constraints)
        if not restart:
            break
    else:
        raise EstimateError("torch's dependencies did not settle after 50 passes; inspect the notes")
    for dep, pkg in added.items():
        pkg.wheel, pkg.download_bytes = wheels[dep]["filename"], int(wheels[dep]["size"])
        pkg._wheel = wheels[dep]  # type: ignore[attr-defined]
        if not pkg.origin.endswith("(pinned)"):
            notes.append(
                f"{dep}: constraints '{constraints[dep]}' pin no version;"
                f" took the newest match, {pkg.version}"
            )
    for name, version in pins.items():
        if name in constraints and Version(version) not in constraints[name]:
            notes.append(
                f"lock pins {name}=={version} but torch's dependencies require '{constraints[name]}'"
            )
    return added


def _walk(pins, torch_wheel, constraints):
    added: dict[str, Package] = {}
    extras_seen: dict[str, set[str]] = {"torch": set()}
    wheels: dict[str, dict] = {"torch": torch_wheel}
    queue: list[str] = ["torch"]
    while queue:
        name = queue.pop(0)
        for line in metadata_requires(wheels[name]):
            req = Requirement(line)
            if not active(req, extras_seen[name]):
                continue
            dep = canonicalize_name(req.name)
            spec = constraints.get(dep, SpecifierSet()) & req.specifier
            constraints[dep] = spec
            if dep in pins:
                continue
            new_extras = set(req.extras) - extras_seen.get(dep, set())
            if dep in added or dep == name:
                if dep in added and Version(added[dep].version) not in spec:
                    return added, wheels, True  # an earlier pick is now ruled out: start over
                if new_extras:  # more extras of an already chosen package: walk it again with them
                    extras_seen[dep] |= new_extras
                    queue.append(dep)
                continue
            version, wheel, _ = choose(Requirement(f"{req.name}{spec}" if str(spec) else req.name))
            pinned = any(s.operator in ("==", "===") for s in spec)
            added[dep] = Package(dep, str(version), "torch dep (pinned)" if pinned else "torch dep (newest)")
            wheels[dep], extras_seen[dep] = wheel, set(req.extras)
            queue.append(dep)
    return added, wheels, False


def cuda_version(torch_requires: list[str]) -> str:
    for line in torch_requires:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "cuda-toolkit" or name.startswith("nvidia-cuda-runtime"):
            return f"{req.name}{req.specifier}"
    return "unknown (no cuda-toolkit / nvidia-cuda-runtime requirement)"


def estimate(lock: Path, workers: int) -> dict:
    pins = read_lock(lock)
    notes: list[str] = []
    _, torch_wheel, _ = choose(Requirement(f"torch=={pins['torch']}"))
    torch_requires = [line for line in metadata_requires(torch_wheel) if active(Requirement(line), set())]
    extra = resolve_torch_extras(pins, torch_wheel, notes)

    def lock_job(item: tuple[str, str]) -> Package:
        name, version = item
        v, wheel, _ = choose(Requirement(f"{name}=={version}"))
        return measure(Package(name, str(v), "lock"), wheel)

    def extra_job(pkg: Package) -> Package:
        return measure(pkg, pkg._wheel)  # type: ignore[attr-defined]

    with ThreadPoolExecutor(workers) as pool:
        packages = list(pool.map(lock_job, sorted(pins.items())))
        packages += list(pool.map(extra_job, extra.values()))
    packages.sort(key=lambda p: p.installed_bytes, reverse=True)

    def total(attr: str, pred=lambda p: True) -> int:
        return sum(getattr(p, attr) for p in packages if pred(p))

    cuda_like = lambda p: p.origin != "lock"  # noqa: E731
    return {
        "lock": str(lock),
        "platform": "linux x86_64, CPython 3.11 (manylinux up to glibc 2.39)",
        "torch_wheel": torch_wheel["filename"],
        "torch_cuda": cuda_version(torch_requires),
        "torch_linux_requires": [r for r in torch_requires if Requirement(r).marker is not None],
        "totals": {
            "packages": len(packages),
            "download_bytes": total("download_bytes"),
            "installed_bytes": total("installed_bytes"),
            "py_source_bytes": total("py_source_bytes"),
            "files": total("files"),
            "lock_installed_bytes": total("installed_bytes", lambda p: not cuda_like(p)),
            "torch_deps_installed_bytes": total("installed_bytes", cuda_like),
            "torch_deps_download_bytes": total("download_bytes", cuda_like),
        },
        "notes": notes,
        "packages": [{k: v for k, v in asdict(p).items() if k != "requires"} for p in packages],
    }


def print_table(result: dict) -> None:
    print(f"lock: {result['lock']}   platform: {result['platform']}")
    print(f"torch wheel: {result['torch_wheel']}   CUDA: {result['torch_cuda']}\n")
    print(f"{'package':34} {'version':16} {'origin':20} {'download MB':>12} {'installed MB':>13}")
    for p in result["packages"]:
        print(
            f"{p['name']:34} {p['version']:16} {p['origin']:20} "
            f"{p['download_bytes'] / MB:12.1f} {p['installed_bytes'] / MB:13.1f}"
        )
    t = result["totals"]
    print(
        f"\n{'TOTAL (' + str(t['packages']) + ' packages)':72} "
        f"{t['download_bytes'] / MB:12.1f} {t['installed_bytes'] / MB:13.1f}"
    )
    print(
        "  of which torch's Linux deps (not in the lock):"
        f" download {t['torch_deps_download_bytes'] / MB:.1f} MB,"
        f" installed {t['torch_deps_installed_bytes'] / MB:.1f} MB"
    )
    print(f"  files: {t['files']}, .py source: {t['py_source_bytes'] / MB:.1f} MB (MB = 10^6 bytes)")
    for note in result["notes"]:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default_lock = Path(__file__).resolve().parents[1] / "requirements/worker.lock"
    parser.add_argument("--lock", type=Path, default=default_lock, help="lock file (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--workers", type=int, default=8, help="parallel HTTP requests")
    args = parser.parse_args(argv)
    if not args.lock.is_file():
        print(f"error: lock file {args.lock} not found; pass --lock PATH", file=sys.stderr)
        return 2
    try:
        result = estimate(args.lock, args.workers)
    except EstimateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
