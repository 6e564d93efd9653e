"""The streaming multipart/related reader of STOW-RS: the same parts whatever the chunking, bounded headers,
truncation and garbage detected."""

from __future__ import annotations

import os

import pytest

from worker.api.multipart import MultipartError, MultipartReader, content_type_params


class Collect:
    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytes]] = []
        self.open = False

    def part_begin(self, headers: dict[str, str]) -> None:
        assert not self.open
        self.open = True
        self.parts.append((headers, b""))

    def part_data(self, data: bytes) -> None:
        headers, body = self.parts[-1]
        self.parts[-1] = (headers, body + data)

    def part_end(self) -> None:
        self.open = False


def body(boundary: str, parts: list[bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\nepilogue".encode()


def parse(data: bytes, boundary: str, step: int) -> list[tuple[dict[str, str], bytes]]:
    collect = Collect()
    reader = MultipartReader(boundary, collect)
    for start in range(0, len(data), step):
        reader.feed(data[start : start + step])
    reader.close()
    return collect.parts


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_parts_are_the_same_whatever_the_chunking(step: int) -> None:
    boundary = "b0undary"
    payloads = [os.urandom(300), b"", b"\r\n--b0undar", b"--b0undary-not-at-line-start" + os.urandom(50)]
    parts = parse(body(boundary, payloads, preamble=b"ignored preamble\r\n"), boundary, step)
    assert [p for _, p in parts] == payloads
    assert all(h == {"content-type": "application/dicom"} for h, _ in parts)


def test_truncated_body_is_an_error() -> None:
    data = body("xyz", [b"abc" * 100])
    collect = Collect()
    reader = MultipartReader("xyz", collect)
    reader.feed(data[:200])
    with pytest.raises(MultipartError, match="ended before the closing boundary"):
        reader.close()


def test_endless_headers_are_refused_without_growing() -> None:
    reader = MultipartReader("xyz", Collect())
    reader.feed(b"--xyz\r\n")
    with pytest.raises(MultipartError, match="headers are longer"):
        for _ in range(40):
            reader.feed(b"X-Filler: " + b"a" * 1000 + b"\r\n")


def test_garbage_after_a_delimiter_is_an_error() -> None:
    reader = MultipartReader("xyz", Collect())
    with pytest.raises(MultipartError, match="garbage"):
        reader.feed(b"--xyz junk\r\nContent-Type: a/b\r\n\r\nbody\r\n--xyz--")


def test_content_type_parameters() -> None:
    media, params = content_type_params('Multipart/Related; type="application/dicom"; Boundary=abc')
    assert media == "multipart/related" and params == {"type": "application/dicom", "boundary": "abc"}


def test_a_boundary_longer_than_rfc_2046_allows_is_taken_within_bounds() -> None:
    """Orthanc's DICOMweb plugin uses two UUIDs (73 characters); absurd lengths are still refused."""
    boundary = "a" * 36 + "-" + "b" * 36
    assert parse(body(boundary, [b"x" * 10]), boundary, 5)[0][1] == b"x" * 10
    with pytest.raises(MultipartError, match="boundary"):
        MultipartReader("c" * 257, Collect())
