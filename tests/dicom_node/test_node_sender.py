"""The C-STORE/C-ECHO SCU: per-instance status, context negotiation with fallback, failure classes."""

from __future__ import annotations

import socket
import threading

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, evt

from dicom_node.params import PeerParams, TlsParams
from dicom_node.sender import Failure, classify_status, echo, send_files
from dicom_node.status import StoreStatus
from tests.dicom_node.dicom_fixtures import make_certificates

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peer(port: int, **kwargs) -> PeerParams:
    return PeerParams("RETINALGPT", "127.0.0.1", port, calling_ae_title="CAMERA1", timeout=10, **kwargs)


def test_send_files_reports_each_instance(start_listener, op_file):
    listener, sink = start_listener()
    files = [op_file(f"{i}.dcm") for i in range(3)]
    result = send_files(_peer(listener.port), files)
    assert result.ok and result.failure is None
    assert [r.status for r in result.instances] == [0, 0, 0]
    assert {r.sop_instance_uid for r in result.instances} == {i.sop_instance_uid for i, _ in sink.stored}
    assert {i.transfer_syntax_uid for i, _ in sink.stored} == {JPEGBaseline8Bit}


def test_echo_and_rejection_and_refused_connection(start_listener):
    listener, _ = start_listener()
    assert echo(_peer(listener.port)).ok
    rejected = echo(PeerParams("RETINALGPT", "127.0.0.1", listener.port, calling_ae_title="STRANGER"))
    assert rejected.failure is Failure.PERMANENT and "rejected" in rejected.message
    refused = send_files(_peer(_closed_port()), [])
    assert refused.ok  # nothing to send
    nobody = echo(_peer(_closed_port()))
    assert nobody.failure is Failure.TRANSIENT


def test_unreadable_file_is_a_permanent_failure_of_that_file_only(start_listener, op_file, tmp_path):
    listener, sink = start_listener()
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    result = send_files(_peer(listener.port), [junk, op_file()])
    assert [r.ok for r in result.instances] == [False, True]
    assert result.instances[0].failure is Failure.PERMANENT
    assert result.failure is Failure.PERMANENT
    assert len(sink.stored) == 1


@pytest.fixture
def uncompressed_only_scp():
    """A peer that accepts OP only in Explicit/Implicit VR Little Endian and records what it got."""
    received = []

    def on_store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        received.append((event.context.transfer_syntax, dataset))
        return 0x0000

    ae = AE(ae_title="RETINALGPT")
    ae.add_supported_context(OP_8BIT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield server.server_address[1], received
    server.shutdown()


def test_compressed_file_falls_back_to_uncompressed_when_peer_requires(uncompressed_only_scp, op_file):
    port, received = uncompressed_only_scp
    sent = op_file()
    result = send_files(_peer(port), [sent])
    assert result.ok, result
    syntax, dataset = received[0]
    assert syntax == ExplicitVRLittleEndian
    source = dcmread(sent)
    assert dataset.SOPInstanceUID == source.SOPInstanceUID
    assert (dataset.pixel_array == source.pixel_array).all()


def test_sop_class_the_peer_does_not_accept_is_permanent(uncompressed_only_scp, tmp_path, op_file):
    port, _ = uncompressed_only_scp
    ds = dcmread(op_file())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    path = tmp_path / "sc.dcm"
    ds.save_as(path)
    result = send_files(_peer(port), [path])
    assert result.failure is Failure.PERMANENT
    assert "none of the proposed presentation contexts" in result.association_error


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, None), (0xB000, None), (0xB007, None),
        (0xA700, Failure.TRANSIENT), (0xA7FF, Failure.TRANSIENT), (0x0110, Failure.TRANSIENT),
        (0x0122, Failure.PERMANENT), (0xA900, Failure.PERMANENT), (0xC000, Failure.PERMANENT),
        (StoreStatus.PIXEL_DATA_TRUNCATED, Failure.PERMANENT),
    ],
)
def test_status_classification(status, expected):
    assert classify_status(status) is expected


def test_peer_that_stalls_is_a_transient_failure(op_file):
    """A peer that accepts the association but never answers C-STORE: the DIMSE timeout ends it."""
    release = threading.Event()

    def on_store(event):
        release.wait(10)
        return 0x0000

    ae = AE(ae_title="RETINALGPT")
    ae.add_supported_context(OP_8BIT, [JPEGBaseline8Bit])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        peer = PeerParams("RETINALGPT", "127.0.0.1", server.server_address[1], calling_ae_title="CAMERA1", timeout=1)
        result = send_files(peer, [op_file()])
        assert result.instances[0].failure is Failure.TRANSIENT
    finally:
        release.set()
        server.shutdown()


def test_send_over_tls_with_client_certificate(start_listener, op_file, tmp_path):
    certs = make_certificates(tmp_path)
    listener, sink = start_listener(tls=TlsParams(certs.server_cert, certs.server_key, certs.ca,
                                                  require_peer_certificate=True))
    client = TlsParams(certs.client_cert, certs.client_key, certs.ca)
    result = send_files(_peer(listener.port, tls=client), [op_file()])
    assert result.ok, result
    assert len(sink.stored) == 1
    anonymous = echo(_peer(listener.port, tls=TlsParams(ca_certificates=certs.ca)))
    assert not anonymous.ok and anonymous.failure is Failure.TRANSIENT
    untrusted = echo(_peer(listener.port, tls=TlsParams(certs.client_cert, certs.client_key)))
    assert not untrusted.ok  # the server certificate is not signed by a CA the system trusts
