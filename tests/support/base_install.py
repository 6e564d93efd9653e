"""The base install (``pip install retinalgpt`` without extras) as a real virtual environment, made in seconds.

The dependency closure of ``[project] dependencies`` in this checkout's pyproject.toml is walked through the
distributions installed in the running environment (markers evaluated, requested extras followed); a new venv
gets exactly those distributions, linked file by file from the running site-packages. torch, transformers and
everything else outside the closure is really absent there, so code run in it proves what the base install can
do (roles importable without torch, pixel data decodable without GPL code)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import venv
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def project_requirements(extras: Iterable[str] = ()) -> list[Requirement]:
    """The base requirements of this checkout's pyproject.toml, plus those of ``extras``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def closure(requirements: Iterable[Requirement]) -> dict[str, Distribution]:
    """Every installed distribution the requirements need, transitively, keyed by canonical name; a
    requirement of this project itself (``retinalgpt[model]``) expands to its extras."""
    found: dict[str, Distribution] = {}
    pending = [(req, frozenset({""})) for req in requirements]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        req, parent_extras = pending.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        if name == "retinalgpt":
            pending += [(r, frozenset({""})) for r in project_requirements(req.extras)]
            continue
        try:
            dist = distribution(req.name)
        except PackageNotFoundError as exc:
            raise AssertionError(f"{req} is required but not installed") from exc
        found[name] = dist
        extras = frozenset({"", *req.extras})
        pending += [(Requirement(line), extras) for line in dist.requires or []]
    return found


@dataclass(frozen=True)
class BaseVenv:
    root: Path
    python: Path
    distributions: frozenset[str]

    def run(self, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``code`` in the venv with this checkout first on the path (the project itself, uninstalled)."""
        return subprocess.run([str(self.python), "-c", code, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                              "HOME": str(self.root)})


def make_base_venv(root: Path) -> BaseVenv:
    """A venv holding exactly the base install's dependency closure (see the module docstring)."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    purelib = Path(sysconfig.get_paths()["purelib"])
    target = Path(subprocess.run([str(root / "bin" / "python"), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    dists = closure(project_requirements())
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        for entry in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source, link = base / entry, target / entry
            if source.exists() and not link.exists():
                link.symlink_to(source)
    assert target != purelib
    return BaseVenv(root, root / "bin" / "python", frozenset(dists))


if __name__ == "__main__":  # pragma: no cover - a manual look at the closure
    for name, dist in sorted(closure(project_requirements(sys.argv[1:])).items()):
        print(name, dist.version)
