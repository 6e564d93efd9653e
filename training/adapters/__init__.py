"""Dataset adapters: each turns one dataset layout into :class:`training.records.Record` objects.

:func:`load_dataset` picks the adapter by name (``kind``); :data:`ADAPTERS` lists them. The shared datasets
under ``../shared/data/fundus`` have one adapter each (:mod:`training.adapters.shared`), the public layouts
users bring have theirs (:mod:`training.adapters.public`), and :mod:`training.adapters.generic` reads the
documented folder + CSV format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from training.adapters import generic, public, shared
from training.records import Record

Adapter = Callable[[Path], list[Record]]

ADAPTERS: dict[str, Adapter] = {
    **shared.ADAPTERS,
    **public.ADAPTERS,
    "generic": generic.load,
}

EVALUATION_ONLY = frozenset(shared.EVALUATION_ONLY)


def load_dataset(kind: str, root: Path) -> list[Record]:
    """Records of the dataset at ``root`` read by the adapter named ``kind``."""
    try:
        adapter = ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(ADAPTERS))}") from None
    if not Path(root).is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    return adapter(Path(root))
