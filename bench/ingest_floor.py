"""How fast can any CPython storage SCP be here? A lower bound for issue 2's ingest target.

Runs the same storescu load as ``bench/ingest.py`` against dcmtk's ``storescp`` and against the least a Python
C-STORE receiver must do, in one process with one thread per association and blocking sockets (no reactor
threads, no polling, no hand-offs): decode the A-ASSOCIATE-RQ and negotiate with pynetdicom's PDU classes,
read P-DATA-TF PDUs, write each data set to a temp file while hashing it (SHA-256, as the node records), rename
it into place, answer C-STORE-RSP Success. No data set identification, no database, no AE policy, no File
Meta Information: everything the product adds costs more. Measured with and without fsync of the file and
its directory.

If this floor is below 0.5× storescp, no CPython receive path reaches the target on this machine.

    .venv/bin/python bench/ingest_floor.py [--count 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import struct
import sys
import threading
from io import BytesIO
from pathlib import Path

from ingest import compare_with_storescp, free_port, images_per_second

_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
_P_DATA_TF, _A_RELEASE_RQ = 0x04, 0x05
_A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def _read(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if not n:
            raise EOFError
        got += n
    return buffer


def _read_pdu(sock: socket.socket) -> tuple[int, bytearray, bytearray]:
    header = _read(sock, 6)
    kind, _, length = _PDU_HEADER.unpack(header)
    return kind, header, _read(sock, length)


def _accept(sock: socket.socket) -> None:
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.presentation import StoragePresentationContexts, build_context, negotiate_as_acceptor

    _, header, body = _read_pdu(sock)
    request = A_ASSOCIATE_RQ()
    request.decode(bytes(header + body))
    primitive = request.to_primitive()
    supported = [build_context(c.abstract_syntax, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
                 for c in StoragePresentationContexts]
    accepted, _ = negotiate_as_acceptor(primitive.presentation_context_definition_list, supported)
    answer = A_ASSOCIATE()
    answer.application_context_name = primitive.application_context_name
    answer.calling_ae_title, answer.called_ae_title = primitive.calling_ae_title, primitive.called_ae_title
    answer.result = 0
    answer.presentation_context_definition_results_list = accepted
    max_length, implementation = MaximumLengthNotification(), ImplementationClassUIDNotification()
    max_length.maximum_length_received = 16382
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    answer.user_information = [max_length, implementation]
    sock.sendall(A_ASSOCIATE_AC(answer).encode())


def _response(command: bytes, context_id: int) -> bytes:
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import decode, encode

    request = decode(BytesIO(command), True, True)
    response = Dataset()
    response.AffectedSOPClassUID = request.AffectedSOPClassUID
    response.CommandField = 0x8001
    response.MessageIDBeingRespondedTo = request.MessageID
    response.CommandDataSetType = 0x0101
    response.Status = 0x0000
    response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    elements = encode(response, True, True)
    group = Dataset()
    group.CommandGroupLength = len(elements)
    encoded = encode(group, True, True) + elements
    pdv = _PDV_HEADER.pack(len(encoded) + 2, context_id, 0x03) + encoded
    return _PDU_HEADER.pack(_P_DATA_TF, 0, len(pdv)) + pdv


def _serve_association(sock: socket.socket, folder: Path, fsync: bool) -> None:
    try:
        _receive(sock, folder, fsync)
    except EOFError:  # the harness's readiness probe, or storescu closing after A-RELEASE
        pass
    finally:
        sock.close()


def _receive(sock: socket.socket, folder: Path, fsync: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _accept(sock)
    command, received = bytearray(), 0
    fd, digest, temp, response = -1, hashlib.sha256(), "", b""
    while True:
        kind, _, body = _read_pdu(sock)
        if kind == _A_RELEASE_RQ:
            sock.sendall(_A_RELEASE_RP)
            return
        if kind != _P_DATA_TF:
            return
        view, offset = memoryview(body), 0
        while offset < len(body):
            length, context_id, control = _PDV_HEADER.unpack_from(view, offset)
            fragment = view[offset + 6 : offset + 4 + length]
            offset += 4 + length
            if control & 0x01:
                command += fragment
                if control & 0x02:
                    response, command = _response(bytes(command), context_id), bytearray()
                    temp = str(folder / f"{threading.get_ident()}-{received}.tmp")
                    received += 1
                    fd, digest = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), hashlib.sha256()
                continue
            os.write(fd, fragment)
            digest.update(fragment)
            if control & 0x02:
                if fsync:
                    os.fsync(fd)
                os.close(fd)
                os.rename(temp, temp[:-4] + ".dcm")
                if fsync:
                    directory = os.open(folder, os.O_RDONLY)
                    os.fsync(directory)
                    os.close(directory)
                digest.hexdigest()
                sock.sendall(response)


def serve(port: int, folder: Path, fsync: bool) -> None:
    server = socket.create_server(("127.0.0.1", port), backlog=16)
    while True:
        connection, _ = server.accept()
        threading.Thread(target=_serve_association, args=(connection, folder, fsync), daemon=True).start()


def run_floor(work: Path, files: list[Path], associations: int, fsync: bool) -> float:
    out = work / "floor"
    out.mkdir()
    port = free_port()
    rate = images_per_second([sys.executable, __file__, "--serve", str(port), str(out), "--fsync", str(int(fsync))],
                             port, "FLOOR", files, associations)
    assert len(list(out.glob("*.dcm"))) == len(files)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--fsync", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]), bool(args.fsync))
        return
    compare_with_storescp(args.count, args.repeat, "floor", run_floor)


if __name__ == "__main__":
    main()
