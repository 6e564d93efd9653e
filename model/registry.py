"""Versioned RetinalGPT model directories with an active pointer (``[model] registry`` in the configuration).

Layout::

    <registry>/versions/<version>/     a model directory (:mod:`model.checkpoint`)
    <registry>/registry.json           index: per version sha256, Device UID, registration time, source;
                                       the active version and the activation history (for rollback)
    <registry>/.lock                   advisory lock held while the index changes

The Device UID of a version is derived from its weights' SHA-256 (:func:`model.checkpoint.device_uid`), so it
changes with the weights and goes into every result (TID 4019, ContributingEquipmentSequence).

Interfaces (the training module promotes models with these)::

    reg = ModelRegistry(root)
    reg.register(model_dir, version=None, move=False, activate=False) -> ModelVersion
    reg.activate(version) -> ModelVersion ; reg.rollback() -> ModelVersion
    reg.list() -> list[ModelVersion] ; reg.get(version) ; reg.active() -> ModelVersion | None
    reg.set_shadow(version | None) -> ModelVersion | None ; reg.shadow() -> ModelVersion | None
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import (
    CheckpointError,
    ModelMetadata,
    checkpoint_sha256,
    device_uid,
    validate_model_dir,
    write_metadata,
)
from model.schema import ModelIdentity

INDEX_FILE = "registry.json"
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(ValueError):
    """A registry operation cannot be done; the message says why in one line."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version."""

    version: str
    path: Path
    metadata: ModelMetadata
    sha256: str
    device_uid: str
    registered: str
    source: str | None
    active: bool

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(
            name=self.metadata.name,
            version=self.version,
            device_uid=self.device_uid,
            checkpoint_sha256=self.sha256,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.metadata.name,
            "preset": self.metadata.preset,
            "path": str(self.path),
            "sha256": self.sha256,
            "device_uid": self.device_uid,
            "registered": self.registered,
            "source": self.source,
            "protocol_version": self.metadata.protocol_version,
            "image_size": self.metadata.image.size,
            "active": self.active,
            "provenance": self.metadata.provenance,
        }


class ModelRegistry:
    """The model versions below ``root`` (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # index --------------------------------------------------------------------------------------------------------

    def _index(self) -> dict[str, Any]:
        file = self.root / INDEX_FILE
        if not file.is_file():
            return {"active": None, "history": [], "versions": {}}
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{file} is corrupt: {exc}") from None

    def _write_index(self, index: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".registry-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / INDEX_FILE)

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                index = self._index()
                yield index
                self._write_index(index)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _version(self, index: dict[str, Any], version: str) -> ModelVersion:
        entry = index["versions"].get(version)
        if entry is None:
            known = ", ".join(index["versions"]) or "none registered"
            raise RegistryError(f"unknown model version {version!r} (known: {known})")
        path = self.root / "versions" / version
        try:
            metadata = validate_model_dir(path)
        except CheckpointError as exc:
            raise RegistryError(f"version {version}: {exc}") from None
        return ModelVersion(
            version=version,
            path=path,
            metadata=metadata,
            sha256=entry["sha256"],
            device_uid=entry["device_uid"],
            registered=entry["registered"],
            source=entry.get("source"),
            active=index.get("active") == version,
        )

    # queries ------------------------------------------------------------------------------------------------------

    def list(self) -> list[ModelVersion]:
        """All versions, oldest registration first."""
        index = self._index()
        versions = [self._version(index, v) for v in index["versions"]]
        return sorted(versions, key=lambda v: v.registered)

    def get(self, version: str) -> ModelVersion:
        return self._version(self._index(), version)

    def active(self) -> ModelVersion | None:
        index = self._index()
        return self._version(index, index["active"]) if index.get("active") else None

    def shadow(self) -> ModelVersion | None:
        """The candidate version inference workers run in shadow mode next to the active one, or None."""
        index = self._index()
        return self._version(index, index["shadow"]) if index.get("shadow") else None

    # changes ------------------------------------------------------------------------------------------------------

    def register(
        self,
        source: Path,
        version: str | None = None,
        move: bool = False,
        activate: bool = False,
        source_label: str | None = None,
    ) -> ModelVersion:
        """Copy (or move) the model directory ``source`` in as ``version`` (default ``v<n+1>``), record its
        checksum and Device UID, optionally activate it. The stored ``retinalgpt.json`` carries the version."""
        metadata = validate_model_dir(source)
        with self._locked() as index:
            name = version or _next_version(index["versions"])
            if not VERSION_PATTERN.match(name):
                raise RegistryError(f"version {name!r} must be 1-64 of letters, digits, '.', '_', '-'")
            if name in index["versions"]:
                raise RegistryError(f"model version {name!r} already exists")
            target = self.root / "versions" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
            staging.rmdir()
            if move:
                shutil.move(str(source), staging)
            else:
                shutil.copytree(source, staging)
            metadata.version = name
            write_metadata(staging, metadata)
            sha = checkpoint_sha256(staging)
            os.replace(staging, target)
            index["versions"][name] = {
                "sha256": sha,
                "device_uid": device_uid(sha),
                "registered": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                "source": source_label or str(source),
            }
            if activate:
                _set_active(index, name)
        return self.get(name)

    def activate(self, version: str) -> ModelVersion:
        """Make ``version`` the active one (workers pick it up on their next model load); a shadow candidate
        that becomes active stops being the shadow."""
        with self._locked() as index:
            self._version(index, version)
            _set_active(index, version)
            if index.get("shadow") == version:
                index["shadow"] = None
        return self.get(version)

    def set_shadow(self, version: str | None) -> ModelVersion | None:
        """Run ``version`` in shadow mode (None: stop); the active version cannot be its own shadow."""
        with self._locked() as index:
            if version is not None:
                self._version(index, version)
                if index.get("active") == version:
                    raise RegistryError(f"version {version!r} is the active version; shadow a candidate")
            index["shadow"] = version
        return self.get(version) if version is not None else None

    def rollback(self) -> ModelVersion:
        """Re-activate the version that was active before the current one."""
        with self._locked() as index:
            history = index.get("history", [])
            if len(history) < 2:
                raise RegistryError("no earlier active version to roll back to")
            history.pop()
            previous = history[-1]
            self._version(index, previous)
            index["active"] = previous
            if index.get("shadow") == previous:
                index["shadow"] = None
        return self.get(previous)


def _set_active(index: dict[str, Any], version: str) -> None:
    index["active"] = version
    history = index.setdefault("history", [])
    if not history or history[-1] != version:
        history.append(version)


def _next_version(versions: dict[str, Any]) -> str:
    numbers = [int(v[1:]) for v in versions if re.fullmatch(r"v\d+", v)]
    return f"v{max(numbers, default=0) + 1}"


def resolve_model_path(path: Path | None, registry: Path) -> Path | None:
    """The model directory to run: ``path`` when configured, else the registry's active version, else None."""
    if path is not None:
        return Path(path)
    active = ModelRegistry(registry).active()
    return active.path if active else None
