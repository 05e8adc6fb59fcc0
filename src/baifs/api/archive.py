"""Download payloads: `multipart/mixed` framing and tar archives, both ends.

A download response (reference §5.1) is a `multipart/mixed` body with one part
per requested path, in request order, each part a tar archive. This module owns
the framing (`encode_mixed` for the server, `decode_multipart` for the client)
and the safe reading of the archives.

Invariants:
- `extract_tar` never writes outside its destination: absolute names, ``..``
  components, device files and links that point outside are refused (Python's
  ``data`` tar filter, plus a check of every member before anything is written);
- `single_member` reads one member from memory and never touches the disk.
"""

from __future__ import annotations

import io
import secrets
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import ProtocolError

ACCEPTED_TRANSFER_ENCODINGS = {"binary", "8bit", "7bit"}


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    #: pieces of the body: views into the decoded message, not copies.
    pieces: list[memoryview] = field(default_factory=list)

    @property
    def body(self) -> memoryview:
        """The part's body (a view into the message when it came in one piece)."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        return memoryview(b"".join(self.pieces))


def boundary_of(content_type: str) -> bytes:
    media_type, options = parse_options_header(content_type)
    if not media_type.startswith(b"multipart/") or b"boundary" not in options:
        raise ProtocolError(f"expected a multipart body, got {content_type!r}")
    return options[b"boundary"]


def decode_multipart(content_type: str, body: bytes) -> list[Part]:
    """Split a complete multipart body into its parts (headers lower-cased).

    Part bodies are views into ``body``: a download of five 1 MiB archives is
    not copied again on its way to the tar reader.
    """
    message = memoryview(body)
    parts: list[Part] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        parts.append(Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").lower()] = header_value.decode("latin-1")
        header_field.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if data is body:
            parts[-1].pieces.append(message[start:end])
        else:  # the parser's own buffer: copy
            parts[-1].pieces.append(memoryview(bytes(data[start:end])))

    parser = MultipartParser(
        boundary_of(content_type),
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    parser.write(body)
    parser.finalize()
    for part in parts:
        encoding = part.headers.get("content-encoding", "identity").lower()
        transfer = part.headers.get("content-transfer-encoding", "binary").lower()
        if encoding != "identity" or transfer not in ACCEPTED_TRANSFER_ENCODINGS:
            raise ProtocolError(f"unsupported part encoding {encoding!r}/{transfer!r}")
    return parts


def encode_mixed(payloads: list[bytes]) -> tuple[str, bytes]:
    """A `multipart/mixed` body as aiohttp's MultipartWriter writes it for downloads."""
    boundary = secrets.token_hex(16)
    out = io.BytesIO()
    for payload in payloads:
        out.write(f"--{boundary}\r\n".encode())
        out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"Content-Encoding: identity\r\n")
        out.write(f"Content-Length: {len(payload)}\r\n\r\n".encode())
        out.write(payload)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/mixed; boundary={boundary}", out.getvalue()


def open_tar(data: bytes | memoryview) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.TarError as exc:
        raise ProtocolError("a download part is not a tar archive") from exc


def single_member(data: bytes | memoryview) -> tuple[tarfile.TarInfo, bytes]:
    """The only member of a one-file archive and its content (b"" unless regular)."""
    with open_tar(data) as archive:
        members = archive.getmembers()
        if len(members) != 1:
            raise ProtocolError(f"expected a single-member archive, got {len(members)} members")
        member = members[0]
        if not member.isfile():
            return member, b""
        extracted = archive.extractfile(member)
        if extracted is None:
            raise ProtocolError(f"archive member {member.name!r} has no content")
        return member, extracted.read()


def extract_tar(data: bytes | memoryview, destination: Path) -> list[str]:
    """Extract an archive under ``destination``; returns the member names."""
    destination.mkdir(parents=True, exist_ok=True)
    with open_tar(data) as archive:
        members = archive.getmembers()
        for member in members:
            if member.name.startswith("/") or ".." in member.name.split("/"):
                raise ProtocolError(f"refused unsafe archive member {member.name!r}")
            try:
                tarfile.data_filter(member, str(destination))
            except tarfile.FilterError as exc:
                raise ProtocolError(f"refused unsafe archive member {member.name!r}: {exc}") from exc
        archive.extractall(destination, filter="data")
        return [member.name for member in members]
