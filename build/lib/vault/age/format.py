"""The age v1 header: parse (strictly, with limits) and serialize.

    age-encryption.org/v1
    -> X25519 <base64 share>
    <base64 body, 64 columns, last line shorter (possibly empty)>
    --- <base64 HMAC-SHA-256 over everything up to and including "---">
    <binary payload>

Everything here handles untrusted bytes. Any deviation from the grammar raises one opaque
:class:`~vault.errors.IntegrityError`; we never echo the input back.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from vault.errors import IntegrityError

__all__ = [
    "VERSION_LINE",
    "MAX_HEADER_SIZE",
    "MAX_LINE_LENGTH",
    "MAX_STANZAS",
    "Stanza",
    "Header",
    "b64encode",
    "b64decode",
    "parse_header",
    "serialize_header",
    "finish_header",
]

VERSION_LINE = b"age-encryption.org/v1"
_STANZA_PREFIX = b"->"
_FOOTER_PREFIX = b"---"
COLUMNS_PER_LINE = 64
BYTES_PER_LINE = COLUMNS_PER_LINE // 4 * 3

# Hard limits on untrusted input. A post-quantum stanza argument is ~1.5 kB, so 16 KiB per
# line and 1 MiB per header leave ample room while bounding memory and work.
MAX_HEADER_SIZE = 1 << 20
MAX_LINE_LENGTH = 16 << 10
MAX_STANZAS = 1024

_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


@dataclass(frozen=True)
class Stanza:
    """One recipient stanza: a type, its arguments and an opaque body."""

    type: str
    args: tuple[str, ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Header:
    """A parsed header. ``mac_input`` is the byte string the header MAC covers."""

    stanzas: tuple[Stanza, ...]
    mac: bytes
    mac_input: bytes = field(repr=False)


def b64encode(data: bytes) -> str:
    """Standard base64 without padding, as age writes it."""
    return base64.b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(s: bytes | str) -> bytes:
    """Strict, canonical, unpadded standard base64 (raises ValueError otherwise).

    Python's decoder accepts non-zero trailing bits; age does not (the encoding must be
    canonical so a header has exactly one byte representation), hence the re-encode check.
    """
    raw = s.encode("ascii") if isinstance(s, str) else bytes(s)
    if len(raw) % 4 == 1 or not _B64_ALPHABET.issuperset(raw):
        raise ValueError("invalid base64")
    try:
        out = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except binascii.Error:
        raise ValueError("invalid base64") from None
    if base64.b64encode(out).rstrip(b"=") != raw:
        raise ValueError("non-canonical base64")
    return out


def _valid_arg(arg: bytes) -> bool:
    return len(arg) > 0 and all(33 <= c <= 126 for c in arg)


class _Lines:
    """Reads LF-terminated lines out of a bounded byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def next(self) -> tuple[int, bytes]:
        start = self.pos
        end = self.data.find(b"\n", start, start + MAX_LINE_LENGTH + 1)
        if end < 0:
            raise IntegrityError()  # header truncated, or a line (or the header) too long
        self.pos = end + 1
        return start, self.data[start:end]


def _parse_stanza(line: bytes, lines: _Lines) -> Stanza:
    parts = line.split(b" ")
    if parts[0] != _STANZA_PREFIX or len(parts) < 2 or not all(_valid_arg(a) for a in parts[1:]):
        raise IntegrityError()
    body = bytearray()
    while True:
        _, body_line = lines.next()
        if len(body_line) > COLUMNS_PER_LINE:
            raise IntegrityError()
        try:
            chunk = b64decode(body_line)
        except ValueError:
            raise IntegrityError() from None
        body += chunk
        if len(chunk) < BYTES_PER_LINE:  # a short (possibly empty) line ends the body
            break
    args = tuple(a.decode("ascii") for a in parts[1:])
    return Stanza(type=args[0], args=args[1:], body=bytes(body))


def parse_header(buf: bytes | bytearray | memoryview) -> tuple[Header, int]:
    """Parse the header at the start of ``buf``.

    Returns:
        (header, offset of the first payload byte in ``buf``).
    Raises:
        IntegrityError: anything malformed, over a limit, or truncated.
    """
    data = bytes(memoryview(buf)[:MAX_HEADER_SIZE])
    lines = _Lines(data)
    _, first = lines.next()
    if first != VERSION_LINE:
        raise IntegrityError()
    stanzas: list[Stanza] = []
    while True:
        start, line = lines.next()
        if line.startswith(_FOOTER_PREFIX):
            parts = line.split(b" ")
            if parts[0] != _FOOTER_PREFIX or len(parts) != 2:
                raise IntegrityError()
            try:
                mac = b64decode(parts[1])
            except ValueError:
                raise IntegrityError() from None
            if len(mac) != 32 or not stanzas:
                raise IntegrityError()
            mac_input = data[: start + len(_FOOTER_PREFIX)]
            return Header(tuple(stanzas), mac, mac_input), lines.pos
        if not line.startswith(_STANZA_PREFIX) or len(stanzas) >= MAX_STANZAS:
            raise IntegrityError()
        stanzas.append(_parse_stanza(line, lines))


def _encode_stanza(stanza: Stanza) -> bytes:
    for arg in (stanza.type, *stanza.args):
        if not _valid_arg(arg.encode("ascii")):
            raise ValueError(f"invalid stanza argument {arg!r}")
    encoded = b64encode(stanza.body)
    lines = [encoded[i : i + COLUMNS_PER_LINE] for i in range(0, len(encoded), COLUMNS_PER_LINE)]
    if not lines or len(lines[-1]) == COLUMNS_PER_LINE:
        lines.append("")  # the body always ends with a short line
    head = " ".join(("->", stanza.type, *stanza.args))
    return (head + "\n" + "\n".join(lines) + "\n").encode("ascii")


def serialize_header(stanzas: list[Stanza] | tuple[Stanza, ...]) -> bytes:
    """The header bytes the MAC covers: version line, stanzas, and the final ``---``."""
    if not stanzas:
        raise ValueError("a header needs at least one stanza")
    return VERSION_LINE + b"\n" + b"".join(_encode_stanza(s) for s in stanzas) + _FOOTER_PREFIX


def finish_header(mac_input: bytes, mac: bytes) -> bytes:
    """Append the MAC to :func:`serialize_header` output, giving the complete header."""
    return mac_input + b" " + b64encode(mac).encode("ascii") + b"\n"
