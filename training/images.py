"""Decoded, resized image tensors cached on disk so that every epoch does not decode JPEGs again.

The cache is keyed by the record key, the image file's size and mtime, and the preprocessing size; it is a
single ``uint8`` array file per (dataset, size) so an epoch reads memory, not thousands of files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from training.records import Record

Preprocess = Callable[[np.ndarray], np.ndarray]
"""RGB ``uint8`` H×W×3 in, RGB ``uint8`` size×size×3 out."""


def load_rgb(path: Path) -> np.ndarray:
    """An image file as RGB ``uint8``."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the shortest side to ``size`` (bicubic) and centre-crop ``size``×``size`` (CLIP preprocessing)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _fingerprint(records: Sequence[Record], size: int, tag: str) -> str:
    digest = hashlib.sha256(f"{size}:{tag}".encode())
    for record in records:
        stat = record.image.stat()
        digest.update(f"{record.key}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def cached_pixels(records: Sequence[Record], size: int, cache_dir: Path, preprocess: Preprocess | None = None,
                  tag: str = "square", progress: Callable[[int], None] | None = None) -> np.ndarray:
    """``N×size×size×3`` ``uint8`` pixels of ``records`` (in order), read from or written to ``cache_dir``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _fingerprint(records, size, tag)
    path = cache_dir / f"pixels-{size}-{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    transform = preprocess or (lambda rgb: square_resize(rgb, size))
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for i, record in enumerate(records):
        out[i] = transform(load_rgb(record.image))
        if progress is not None:
            progress(1)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.rename(path)
    (cache_dir / f"pixels-{size}-{key}.json").write_text(json.dumps([r.key for r in records]))
    return out
