"""Bounded, spooled reception of C-STORE data sets.

pynetdicom accumulates a received data set in memory (a ``BytesIO``) with no size limit; its
``_config.STORE_RECV_CHUNKED_DATASET`` option writes it to a file instead, but in the system temp directory
(often a RAM-backed tmpfs), still without a limit, and with pynetdicom's own File Meta Information. This module
uses the same chunked-receive path of pynetdicom's DIMSE message (the data set fragments go to
``message._data_set_file``) with a file of our own:

- the file is created in the store's ``.incoming`` folder (same file system as the final location, removed on
  restart when a reception never completed) and starts with our File Meta Information, so the instance is
  written to disk exactly once and only renamed afterwards;
- the SHA-256 of the file is computed while it is written;
- once the data set grows past ``max_bytes``, further fragments are counted but not kept and the file is cut
  back to nothing; the C-STORE handler then refuses the instance (0xA700) after the last fragment;
- when the storage file system is short of space as the request's command arrives (``refusal_for`` names the
  reason), no file is created at all: the data set is counted and dropped, and the handler answers 0xA700; a
  write that fails on the way (the disk filled up meanwhile, ``ENOSPC``) removes the file, drops the rest and
  ends the same way, so a full disk never leaves a partial file nor breaks the association.

:class:`SpoolingDimse` replaces an association's DIMSE provider when the connection opens (EVT_CONN_OPEN).
It feeds pynetdicom one presentation data value at a time so the spool file is in place between the last
command fragment and the first data set fragment, even when both travel in one P-DATA-TF PDU.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable
from typing import BinaryIO
from pathlib import Path

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

_NO_DATA_SET = 0x0101  # (0000,0800) CommandDataSetType: no data set follows (PS3.7 Table E.1-1)
_BUFFER = 1 << 20

HeaderFor = Callable[[str, str, str], bytes]
"""``header_for(sop_class_uid, sop_instance_uid, transfer_syntax_uid)``: the bytes the stored file starts with."""


class Spool:
    """One received data set on its way to disk: a file in ``folder`` that starts with ``header``.

    pynetdicom writes fragments with ``write`` and calls ``file.flush()`` after each; the handler reads
    ``size`` / ``exceeded`` / ``refusal`` and takes the file with :meth:`finish`. With ``refusal`` given (the
    disk is short of space) no file is created and every fragment is dropped."""

    def __init__(self, folder: Path, header: bytes, max_bytes: int, *, refusal: str | None = None) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self.name = str(self.path)  # pynetdicom unlinks ``name`` after the handler; gone by then if stored
        self.header_length = len(header)
        self.max_bytes = max_bytes
        self.size = 0
        self.exceeded = False
        self.refusal = refusal
        """Why nothing of this data set is kept (no space); None while it is being written."""
        self._digest = hashlib.sha256(header)
        self._file: BinaryIO | None = None
        self.file = self  # pynetdicom calls ``_data_set_file.file.flush()``
        if refusal is None:
            try:
                self._file = open(self.path, "xb", buffering=_BUFFER)  # noqa: SIM115 - closed by finish()/close()
                self._file.write(header)
            except OSError as exc:
                self._give_up(exc)

    @property
    def dropping(self) -> bool:
        return self.exceeded or self.refusal is not None

    def write(self, data: bytes | memoryview) -> int:
        self.size += len(data)
        if self.dropping:
            return len(data)
        if self.size > self.max_bytes:
            self.exceeded = True
            self._truncate()  # keep neither the bytes nor the disk space
            return len(data)
        self._digest.update(data)
        try:
            return self._file.write(data)
        except OSError as exc:  # ENOSPC, EDQUOT, EIO: never raise into pynetdicom's reactor (it would abort)
            self._give_up(exc)
            return len(data)

    def flush(self) -> None:
        """Buffered: the file is flushed (and fsynced) once, in :meth:`finish`."""

    def finish(self, *, fsync: bool) -> str:
        """Flush and close the file (fsync when asked); returns the SHA-256 of the whole file. An
        :class:`OSError` (the disk filled up on the last bytes) removes the file and is raised. Once finished,
        a second call only returns the digest (a STOW-RS part is finished when it ends, filed later)."""
        if self._file is not None and self._file.closed:
            return self._digest.hexdigest()
        try:
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            self._give_up(exc)
            raise
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:  # the buffered tail could not be written: the file is being dropped anyway
                pass

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def _truncate(self) -> None:
        try:
            self._file.seek(0)
            self._file.truncate()
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        """A write failed: drop the file (and its disk space) and every further fragment."""
        self.refusal = f"cannot write: {exc.strerror or exc}"
        log.warning("spool %s: %s; the rest of the data set is dropped", self.path.name, self.refusal)
        if self._file is not None:
            try:
                self._file.seek(0)
                self._file.truncate()  # drops the unwritten buffer too, so close() does not fail again
            except OSError:
                pass
        self.discard()


class SpoolingDimse(DIMSEServiceProvider):
    """A DIMSE provider that receives every C-STORE data set into a :class:`Spool` of at most ``max_bytes``."""

    def __init__(self, assoc, *, folder: Path, max_bytes: int, header_for: HeaderFor,  # noqa: ANN001
                 refusal_for: Callable[[], str | None] = lambda: None) -> None:
        super().__init__(assoc)
        self._folder = folder
        self._max_bytes = max_bytes
        self._header_for = header_for
        self._refusal_for = refusal_for
        self._prepared: object | None = None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            single = P_DATA()
            single.presentation_data_value_list = [[context_id, data if isinstance(data, bytes) else bytes(data)]]
            super().receive_primitive(single)
            message = self.message
            if message is not None and message is not self._prepared and isinstance(message, C_STORE_RQ):
                self._prepared = message
                self._spool_into(message)

    def _spool_into(self, message: C_STORE_RQ) -> None:
        command = message.command_set
        if command.get("CommandDataSetType", _NO_DATA_SET) == _NO_DATA_SET:
            return
        syntax = next((str(cx.transfer_syntax[0]) for cx in self.assoc.accepted_contexts
                       if cx.context_id == message.context_id), "")
        header = self._header_for(str(command.get("AffectedSOPClassUID", "")),
                                  str(command.get("AffectedSOPInstanceUID", "")), syntax)
        spool = Spool(self._folder, header, self._max_bytes, refusal=self._refusal_for())
        message._data_set_file = spool
        message._data_set_path = spool.path

    def discard_unfinished(self) -> None:
        """The connection closed: drop the spool of a data set that never completed."""
        message = self.message
        spool = getattr(message, "_data_set_file", None) if message is not None else None
        if isinstance(spool, Spool):
            spool.discard()
