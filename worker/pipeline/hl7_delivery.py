"""HL7 v2 destination: the ORU^R01 of a study revision sent over MLLP, answered by an ACK (original mode).

The message is built by :func:`reporting.hl7.build_oru` from the revision's written results (the analysis, the
SR for the Patient and Study attributes it copied from the source, and the PDF); this module only frames it
(MLLP, HL7 v2.5.1 Ch. 2 Appendix C: ``<VT> message <FS><CR>``, framing bytes from hl7apy), sends it on one TCP
(optionally TLS) connection and reads the ACK. Outcomes follow the delivery queue's policy
(:mod:`worker.pipeline.delivery`):

* ``AA`` (or ``CA``) with our MSH-10 in MSA-2: delivered;
* ``AE`` / ``CE`` (application error), no answer within ``timeout``, a refused or dropped connection, an ACK of
  another message or an unreadable answer: a transient failure, retried with backoff until ``max_attempts``;
* ``AR`` / ``CR`` (the receiver rejects the message itself), or data that cannot make a safe message (no
  Patient ID): permanent, dead-lettered at once with the reason.

MSH-10 is derived from study, revision and destination, so every attempt sends the same control ID and a
receiver can recognise a repeat of a message it already filed.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from typing import TYPE_CHECKING

import pydicom
from hl7apy.consts import MLLP_ENCODING_CHARS

from model.schema import StudyAnalysis
from reporting.hl7 import Hl7BuildError, OruOptions, build_oru, parse_ack
from worker.config import Destination, TlsSettings
from worker.pipeline.results import WrittenResults

if TYPE_CHECKING:
    from worker.pipeline.delivery import SendOutcome

START = MLLP_ENCODING_CHARS.SB.encode("ascii")
END = (MLLP_ENCODING_CHARS.EB + MLLP_ENCODING_CHARS.CR).encode("ascii")
MAX_ACK_BYTES = 1 << 20


class MllpError(OSError):
    """No acknowledgement came back (connection refused or dropped, timeout, bad framing)."""


def control_id(study_instance_uid: str, revision: int, destination: str) -> str:
    """MSH-10: 20 hex digits, the same for every attempt at one revision to one destination."""
    return hashlib.sha256(f"{study_instance_uid}|{revision}|{destination}".encode()).hexdigest()[:20]


def frame(message: str) -> bytes:
    return START + message.encode("utf-8") + END


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """Client TLS (TLS 1.2 or newer): the receiver verified against ``ca_certificates`` (else the system store),
    our certificate presented only when configured (mutual TLS); server-only TLS needs none."""
    if not tls.enabled:
        return None
    context = ssl.create_default_context(cafile=str(tls.ca_certificates) if tls.ca_certificates else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return context


def exchange(host: str, port: int, message: str, *, timeout: float, connect_timeout: float,
             tls: ssl.SSLContext | None = None) -> str:
    """Send one framed message and return the framed answer's content; :class:`MllpError` when none comes."""
    try:
        raw = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        raise MllpError(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        conn = _handshake(raw, tls, host, port, connect_timeout) if tls is not None else raw
        with conn:
            conn.settimeout(timeout)
            conn.sendall(frame(message))
            return _read_frame(conn, host, port, timeout)
    except MllpError:
        raise
    except TimeoutError as exc:
        raise MllpError(f"no acknowledgement from {host}:{port} within {timeout:g} s") from exc
    except ssl.SSLError as exc:
        raise MllpError(f"TLS failure with {host}:{port}: {exc}") from exc
    except OSError as exc:
        raise MllpError(f"{'TLS connection' if tls is not None else 'connection'} to {host}:{port} failed: {exc}") \
            from exc
    finally:
        raw.close()


def _handshake(raw: socket.socket, tls: ssl.SSLContext, host: str, port: int, connect_timeout: float) -> ssl.SSLSocket:
    """The TLS handshake, within ``connect_timeout`` (part of opening the connection)."""
    try:
        return tls.wrap_socket(raw, server_hostname=host)
    except TimeoutError as exc:
        raise MllpError(f"TLS handshake with {host}:{port} not done within {connect_timeout:g} s") from exc


def _read_frame(conn: socket.socket, host: str, port: int, timeout: float) -> str:
    data = b""
    while END not in data:
        chunk = conn.recv(65536)
        if not chunk:
            if isinstance(conn, ssl.SSLSocket) and not data:
                # TLS 1.3: the receiver checks our certificate (or its absence) after our handshake is over,
                # so a refusal shows as a closed connection when the receiver sends no alert
                raise MllpError(f"{host}:{port} closed the TLS connection without an acknowledgement (TLS "
                                "failure? the receiver may not accept our client certificate, or its absence)")
            raise MllpError(f"{host}:{port} closed the connection without an acknowledgement")
        data += chunk
        if len(data) > MAX_ACK_BYTES:
            raise MllpError(f"{host}:{port} answered more than {MAX_ACK_BYTES} bytes without a frame end")
    start = data.find(START)
    if start < 0:
        raise MllpError(f"{host}:{port} answered without an MLLP start block")
    return data[start + 1:data.index(END, start)].decode("utf-8", errors="replace")


def oru_options(destination: Destination, study_instance_uid: str, revision: int) -> OruOptions:
    h = destination.hl7
    return OruOptions(
        control_id=control_id(study_instance_uid, revision, destination.name),
        sending_application=h.sending_application,
        sending_facility=h.sending_facility,
        receiving_application=h.receiving_application,
        receiving_facility=h.receiving_facility,
        processing_id=h.processing_id,
        result_status=h.result_status,
        patient_class=h.patient_class,
        assigning_authority=h.assigning_authority,
        include_pdf=h.include_pdf,
    )


def message_for(destination: Destination, written: WrittenResults) -> tuple[str, str]:
    """The ORU of the written results for ``destination`` (the same text on every attempt) and its MSH-10."""
    analysis = StudyAnalysis.model_validate_json(written.analysis.read_text())
    context = pydicom.dcmread(written.sr, stop_before_pixels=True)
    pdf = written.pdf.read_bytes() if destination.hl7.include_pdf and written.pdf is not None else None
    options = oru_options(destination, analysis.study_instance_uid, analysis.revision)
    return build_oru(analysis, context, options, pdf, written.read_verification()), options.control_id


def send_hl7(destination: Destination, written: WrittenResults) -> SendOutcome:
    """One attempt: build, send, read the ACK; the outcome for the delivery queue."""
    from worker.pipeline.delivery import SendOutcome

    assert destination.host is not None and destination.port is not None
    try:
        message, sent_id = message_for(destination, written)
    except Hl7BuildError as exc:
        return SendOutcome(ok=False, permanent=True, detail=f"cannot build the ORU: {exc}")
    try:
        answer = exchange(destination.host, destination.port, message, timeout=destination.timeout,
                          connect_timeout=destination.connect_timeout, tls=ssl_context(destination.tls))
    except MllpError as exc:
        return SendOutcome(ok=False, detail=str(exc)[:500])
    try:
        ack = parse_ack(answer)
    except Exception as exc:  # noqa: BLE001 -- any unreadable answer is a failed attempt, retried
        return SendOutcome(ok=False, detail=f"unreadable acknowledgement: {type(exc).__name__}: {exc}"[:500])
    if ack.control_id != sent_id:
        return SendOutcome(ok=False, detail=f"acknowledgement of message {ack.control_id!r}, not {sent_id!r}")
    reason = f"ACK {ack.code}" + (f": {ack.text}" if ack.text else "")
    if ack.accepted:
        return SendOutcome(ok=True, detail=f"{reason} (message {sent_id})", remote_id=sent_id)
    return SendOutcome(ok=False, permanent=ack.rejected, detail=reason[:500])
