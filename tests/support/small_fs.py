"""A real, small file system for disk-full drills: a tmpfs mount, else an ext4 image on a loop device.

Both need root (CAP_SYS_ADMIN); without it the drill is skipped with the reason. The file system is unmounted
(and the loop device detached) when the context ends."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=60)


@contextmanager
def small_filesystem(where: Path, size_mib: int) -> Iterator[Path]:
    """Mount a ``size_mib`` MiB file system at ``where`` (created) and yield it."""
    where.mkdir(parents=True, exist_ok=True)
    loop: str | None = None
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(where)).returncode == 0
    if not mounted and shutil.which("losetup") and shutil.which("mkfs.ext4"):
        image = where.parent / f"{where.name}.img"
        with open(image, "wb") as file:
            file.truncate(size_mib << 20)
        made = _run("mkfs.ext4", "-q", "-m", "0", str(image))
        attached = _run("losetup", "--find", "--show", str(image)) if made.returncode == 0 else made
        if attached.returncode == 0:
            loop = attached.stdout.strip()
            mounted = _run("mount", loop, str(where)).returncode == 0
    if not mounted:
        if loop:
            _run("losetup", "-d", loop)
        pytest.skip("cannot mount a small file system here (tmpfs and loop device both need root)")
    try:
        yield where
    finally:
        _run("umount", "-l", str(where))
        if loop:
            _run("losetup", "-d", loop)


def fill_until_free(folder: Path, free_bytes: int) -> Path:
    """Write a filler file in ``folder`` until at most ``free_bytes`` are free; return it (delete it to free)."""
    filler = folder / "filler.bin"
    stats = os.statvfs(folder)
    excess = stats.f_bavail * stats.f_frsize - free_bytes
    with open(filler, "ab") as file:
        chunk = bytes(1 << 16)
        while excess > 0:
            written = file.write(chunk[: min(len(chunk), excess)])
            excess -= written
    os.sync()
    return filler


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize
