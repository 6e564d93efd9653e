"""Receive one DICOM file (PS3.10) arriving as a byte stream, such as a part of a STOW-RS request (PS3.18
§10.5, ``application/dicom``), into a :class:`~dicom_node.receive.Spool`.

Only the preamble and File Meta Information are held in memory (at most :data:`MAX_META_BYTES`); they are
parsed (PS3.10 §7.1: 128-byte preamble, ``DICM``, group 0002 starting with its group length) to learn the SOP
class, SOP instance and transfer syntax, which are first checked by ``accept`` (the same checks as a C-STORE
request). The data set bytes then go to the spool exactly as received, behind our own File Meta Information,
so the stored file is the same as one received by C-STORE and is never re-encoded; past ``max_bytes`` they are
counted, not kept (the spool cuts itself back), and the instance is refused with 0xA700.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.filereader import data_element_generator

from dicom_node.instance import file_header
from dicom_node.receive import Spool
from dicom_node.sop import TRANSFER_SYNTAXES
from dicom_node.status import StoreStatus

MAX_META_BYTES = 64 * 1024
"""The most a part's preamble and File Meta Information may take before its data set starts."""
_PREFIX = 132
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_META_TAGS = {0x00020002: "sop_class_uid", 0x00020003: "sop_instance_uid", 0x00020010: "transfer_syntax"}


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What the File Meta Information of a received file says (PS3.10 §7.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a received file is refused, with the C-STORE status that stands for it (PS3.18 Failure Reason)."""

    status: StoreStatus
    reason: str
    meta: FileMeta | None = None
    reported: bool = False
    """Already logged and reported to the ingest sink (by ``accept``)."""


Accept = Callable[[FileMeta], Refusal | None]
"""Checks the File Meta Information before the data set is spooled; returns why not, or None."""


class Part10Receiver:
    """One file on its way in: :meth:`write` the bytes as they arrive, then :meth:`close`. Afterwards either
    ``spool`` holds the data set (finished and closed: fsynced when asked) or ``refusal`` says why not."""

    def __init__(self, folder: Path, *, max_bytes: int, source_ae_title: str, accept: Accept, fsync: bool) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.source_ae_title = source_ae_title
        self.accept = accept
        self.fsync = fsync
        self.meta: FileMeta | None = None
        self.spool: Spool | None = None
        self.refusal: Refusal | None = None
        self.received = 0
        self._head = bytearray()

    def write(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        if self.refusal is not None:
            return
        if self.spool is not None:
            self.spool.write(data)
            return
        self._head += data
        try:
            meta, data_set_start = _parse_meta(self._head)
        except ValueError as exc:
            self._refuse(StoreStatus.CANNOT_UNDERSTAND, f"not a DICOM file (PS3.10): {exc}")
            return
        if meta is None:
            if len(self._head) > MAX_META_BYTES:
                self._refuse(StoreStatus.CANNOT_UNDERSTAND,
                             f"File Meta Information does not end within {MAX_META_BYTES} bytes")
            return
        self.meta = meta
        if meta.transfer_syntax not in TRANSFER_SYNTAXES:
            self._refuse(StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED,
                         f"transfer syntax {meta.transfer_syntax} is not supported")
            return
        refusal = self.accept(meta)
        if refusal is not None:
            self.refusal = Refusal(refusal.status, refusal.reason, meta, refusal.reported)
            self._head = bytearray()
            return
        header = file_header(meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax, self.source_ae_title)
        self.spool = Spool(self.folder, header, self.max_bytes)
        rest = bytes(self._head[data_set_start:])
        self._head = bytearray()
        self.spool.write(rest)

    def close(self) -> None:
        """The file ended: finish the spool (its sha256 is computed again when it is filed), or say why the
        bytes were not a DICOM file."""
        if self.refusal is None and self.spool is None:
            what = "empty part" if not self._head else "File Meta Information is cut short"
            self._refuse(StoreStatus.CANNOT_UNDERSTAND, f"not a DICOM file (PS3.10): {what}")
        if self.spool is not None and not self.spool.dropping:
            try:
                self.spool.finish(fsync=self.fsync)
            except OSError:
                pass  # the spool dropped its file and says why (``refusal``); filing refuses it with 0xA700

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()

    def _refuse(self, status: StoreStatus, reason: str) -> None:
        self.refusal = Refusal(status, reason, self.meta)
        self._head = bytearray()
        if self.spool is not None:
            self.spool.discard()
            self.spool = None


def _parse_meta(head: bytearray) -> tuple[FileMeta | None, int]:
    """(meta, offset of the data set) once ``head`` holds the whole File Meta Information, (None, 0) before;
    ValueError when the bytes cannot be a DICOM file."""
    if len(head) >= _PREFIX and head[128:132] != b"DICM":
        raise ValueError("no 'DICM' prefix after the 128-byte preamble")
    if len(head) < _PREFIX + 12:
        return None, 0
    if head[_PREFIX : _PREFIX + 8] != _GROUP_LENGTH:
        raise ValueError("File Meta Information does not start with its group length (0002,0000)")
    (group_length,) = struct.unpack_from("<I", head, _PREFIX + 8)
    end = _PREFIX + 12 + group_length
    if end > MAX_META_BYTES:
        raise ValueError(f"File Meta Information group length {group_length} is implausible")
    if len(head) < end:
        return None, 0
    values: dict[str, str] = {}
    try:
        for element in data_element_generator(BytesIO(bytes(head[_PREFIX + 12 : end])), False, True):
            name = _META_TAGS.get(int(element.tag))
            if name is not None:
                raw = element.value or b""
                values[name] = (raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)).strip(" \x00")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed input
        raise ValueError(f"unreadable File Meta Information: {exc}") from None
    missing = [name for name in _META_TAGS.values() if not values.get(name)]
    if missing:
        raise ValueError(f"File Meta Information lacks {', '.join(missing)}")
    return FileMeta(values["sop_class_uid"], values["sop_instance_uid"], values["transfer_syntax"]), end
