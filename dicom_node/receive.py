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
  back to nothing; the C-STORE handler then refuses the instance (0xA700) after the last fragment.

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
    ``size`` / ``exceeded`` and takes the file with :meth:`finish`."""

    def __init__(self, folder: Path, header: bytes, max_bytes: int) -> None:
        self.path = folder / f"{uuid.uuid4().hex}.part"
        self.name = str(self.path)  # pynetdicom unlinks ``name`` after the handler; gone by then if stored
        self.header_length = len(header)
        self.max_bytes = max_bytes
        self.size = 0
        self.exceeded = False
        self._digest = hashlib.sha256(header)
        self._file = open(self.path, "xb", buffering=_BUFFER)  # noqa: SIM115 - closed by finish()/close()
        self._file.write(header)
        self.file = self  # pynetdicom calls ``_data_set_file.file.flush()``

    def write(self, data: bytes | memoryview) -> int:
        self.size += len(data)
        if self.exceeded:
            return len(data)
        if self.size > self.max_bytes:
            self.exceeded = True
            self._file.seek(0)
            self._file.truncate()  # keep neither the bytes nor the disk space
            return len(data)
        self._digest.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        """Buffered: the file is flushed (and fsynced) once, in :meth:`finish`."""

    def finish(self, *, fsync: bool) -> str:
        """Flush and close the file (fsync when asked); returns the SHA-256 of the whole file. Once finished,
        a second call only returns the digest (a STOW-RS part is finished when it ends, filed later)."""
        if self._file.closed:
            return self._digest.hexdigest()
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        return self._digest.hexdigest()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class SpoolingDimse(DIMSEServiceProvider):
    """A DIMSE provider that receives every C-STORE data set into a :class:`Spool` of at most ``max_bytes``."""

    def __init__(self, assoc, *, folder: Path, max_bytes: int, header_for: HeaderFor) -> None:  # noqa: ANN001
        super().__init__(assoc)
        self._folder = folder
        self._max_bytes = max_bytes
        self._header_for = header_for
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
        spool = Spool(self._folder, header, self._max_bytes)
        message._data_set_file = spool
        message._data_set_path = spool.path

    def discard_unfinished(self) -> None:
        """The connection closed: drop the spool of a data set that never completed."""
        message = self.message
        spool = getattr(message, "_data_set_file", None) if message is not None else None
        if isinstance(spool, Spool):
            spool.discard()
