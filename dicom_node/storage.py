"""Durable instance storage (DESIGN step 1): temp file, fsync, rename to
``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, fsync of the directory.

Files are in the DICOM File Format (PS3.10 §7): preamble, File Meta Information, then the data set bytes
exactly as received, never re-encoded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from pathlib import Path


class InstanceStore:
    """Writes instances below ``root``; thread-safe."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the storage root's file system (``statvfs``
        ``f_bavail × f_frsize``)."""
        return free_bytes(self.root)

    def remove_leftovers(self) -> int:
        """Delete temp files of receptions that never completed (no Success was answered for them)."""
        leftovers = list(self.incoming.glob("*.part"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; the UIDs are validated (digits and dots only) before they get here."""
        return self.root / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def write_temp(self, header: bytes, dataset: bytes) -> tuple[Path, str]:
        """Write header + data set to a temp file on the same file system, fsync it; return (path, sha256)."""
        temp = self.incoming / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256(header)
        digest.update(dataset)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, header)
            _write_all(fd, dataset)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return temp, digest.hexdigest()

    def commit(self, temp: Path, final: Path) -> None:
        """Atomically move a fsynced temp file into place and make the rename durable."""
        self._ensure_dir(final.parent)
        try:
            os.replace(temp, final)
        except FileNotFoundError:
            if not temp.exists():
                raise
            # the folder was removed since it was made (the retention sweep removes emptied study folders)
            with self._dirs_lock:
                self._known_dirs.discard(final.parent)
            self._ensure_dir(final.parent)
            os.replace(temp, final)
        if self.fsync:
            _fsync_dir(final.parent)

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._dirs_lock:
            created = []
            probe = directory
            while not probe.exists():
                created.append(probe)
                probe = probe.parent
            directory.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                for made in created:
                    _fsync_dir(made.parent)
            self._known_dirs.add(directory)


def free_bytes(folder: Path) -> int:
    """Free bytes available to an unprivileged writer on the file system holding ``folder``."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
