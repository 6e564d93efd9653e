"""A streaming ``multipart/related`` body parser (RFC 2387 over RFC 2046 §5.1) for STOW-RS requests.

Push-style: :meth:`MultipartReader.feed` takes the body chunk by chunk and calls the handler as parts begin,
carry data and end; memory use is bounded by the chunk size, the boundary and :data:`MAX_HEADER_BYTES`,
whatever the size of a part. (The maintained parsers on PyPI parse ``multipart/form-data`` only and require a
``Content-Disposition`` per part, which STOW-RS parts do not carry.)
"""

from __future__ import annotations

from email.message import Message
from typing import Protocol

MAX_HEADER_BYTES = 16 * 1024
"""The most one part's header block may take."""
MAX_BOUNDARY = 256
"""RFC 2046 §5.1.1 allows 70 characters; Orthanc's DICOMweb plugin sends 73 (two UUIDs), so we take longer ones
too (memory use stays bounded)."""


class MultipartError(ValueError):
    """The body is not a well-formed multipart body."""


class PartHandler(Protocol):
    def part_begin(self, headers: dict[str, str]) -> None:
        """A part starts; ``headers`` by lower-cased name."""

    def part_data(self, data: bytes) -> None:
        """The next bytes of the current part."""

    def part_end(self) -> None:
        """The current part is complete."""


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """(lower-cased media type, parameters with lower-cased names) of a Content-Type header (RFC 2045 §5.1)."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type(), params


class MultipartReader:
    """Parses one multipart body with ``boundary``; call :meth:`feed` per chunk and :meth:`close` at the end."""

    def __init__(self, boundary: str, handler: PartHandler) -> None:
        if not boundary or len(boundary) > MAX_BOUNDARY:
            raise MultipartError(f"the boundary must have 1 to {MAX_BOUNDARY} characters")
        self._handler = handler
        self._dash = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash
        self._buffer = bytearray(b"\r\n")  # the first delimiter may start the body without a CRLF before it
        self._state = "preamble"
        self.parts = 0

    def feed(self, chunk: bytes) -> None:
        if self._state == "end":
            return  # the epilogue is ignored
        self._buffer += chunk
        while self._step():
            pass

    def close(self) -> None:
        if self._state != "end":
            raise MultipartError("the body ended before the closing boundary")

    def _step(self) -> bool:
        """Advance as far as the buffer allows; True when another step may make progress."""
        buffer = self._buffer
        if self._state == "preamble":
            at = buffer.find(self._delimiter)
            if at < 0:
                del buffer[: max(0, len(buffer) - len(self._delimiter))]
                return False
            del buffer[: at + len(self._delimiter)]
            self._state = "after-delimiter"
            return True
        if self._state == "after-delimiter":
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = "end"
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 256:
                    raise MultipartError("garbage after a boundary delimiter")
                return False
            if buffer[:end].strip(b" \t"):
                raise MultipartError("garbage after a boundary delimiter")
            del buffer[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buffer.startswith(b"\r\n"):  # a part without headers
                headers_end, skip = 0, 2
            else:
                headers_end, skip = buffer.find(b"\r\n\r\n"), 4
            if headers_end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
                return False
            headers = _parse_headers(bytes(buffer[:headers_end]))
            del buffer[: headers_end + skip]
            self.parts += 1
            self._handler.part_begin(headers)
            self._state = "body"
            return True
        if self._state == "body":
            at = buffer.find(self._delimiter)
            if at < 0:
                keep = len(self._delimiter) - 1
                if len(buffer) > keep:
                    self._handler.part_data(bytes(buffer[: len(buffer) - keep]))
                    del buffer[: len(buffer) - keep]
                return False
            if at:
                self._handler.part_data(bytes(buffer[:at]))
            del buffer[: at + len(self._delimiter)]
            self._handler.part_end()
            self._state = "after-delimiter"
            return True
        return False


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and headers:  # folded continuation (RFC 5322 §2.2.3)
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers
