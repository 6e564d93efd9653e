"""An HL7 v2 receiver for tests: an asyncio MLLP server in a thread that keeps every message it receives and
answers each with an ACK built by hl7apy (or stays silent), as an interface engine would."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import deque

from hl7apy.consts import MLLP_ENCODING_CHARS, VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

START = MLLP_ENCODING_CHARS.SB.encode()
END = (MLLP_ENCODING_CHARS.EB + MLLP_ENCODING_CHARS.CR).encode()
SILENT = "silent"


def build_ack(received: str, code: str, text: str = "") -> str:
    """The original-mode ACK of ``received`` (HL7 v2.5.1 §2.9.2): MSH with sender and receiver swapped, MSA-1
    ``code``, MSA-2 the received MSH-10, MSA-3 ``text``."""
    incoming = parse_message(received, validation_level=VALIDATION_LEVEL.TOLERANT)
    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = incoming.msh.msh_5.to_er7()
    ack.msh.msh_4 = incoming.msh.msh_6.to_er7()
    ack.msh.msh_5 = incoming.msh.msh_3.to_er7()
    ack.msh.msh_6 = incoming.msh.msh_4.to_er7()
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = "ACK" + incoming.msh.msh_10.to_er7()[:17]
    ack.msh.msh_11 = incoming.msh.msh_11.to_er7()
    ack.msa.msa_1 = code
    ack.msa.msa_2 = incoming.msh.msh_10.to_er7()
    if text:
        ack.msa.msa_3 = text
    return ack.to_er7()


class MllpReceiver:
    """``with MllpReceiver() as rx:`` listens on ``rx.port``; ``rx.answers`` is a queue of ACK codes (``AA``,
    ``AE``, ``AR``) or :data:`SILENT` used one per message, then ``rx.default``; ``rx.received`` the messages.
    With ``tls`` (a server SSL context) it speaks MLLP over TLS only."""

    def __init__(self, default: str = "AA", tls: ssl.SSLContext | None = None) -> None:
        self.default = default
        self.tls = tls
        self.answers: deque[str] = deque()
        self.received: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._ready = threading.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.readuntil(END)
                message = data[data.index(START) + 1:-len(END)].decode("utf-8")
                self.received.append(message)
                answer = self.answers.popleft() if self.answers else self.default
                if answer == SILENT:
                    continue
                writer.write(START + build_ack(message, answer, f"test receiver says {answer}").encode() + END)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=64 << 20,
                                                  ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> MllpReceiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
