"""age's ASCII armor: strict PEM-like base64 (64 columns, padded, canonical).

    -----BEGIN AGE ENCRYPTED FILE-----
    <base64, 64 columns per line; the last line shorter or full>
    -----END AGE ENCRYPTED FILE-----

Up to 1 KiB of whitespace is allowed around the armor, lines may end in LF or CRLF, and
nothing else is tolerated (no headers, no checksums, no stray whitespace), as in age's
``armor`` package and the C2SP test vectors.
"""

from __future__ import annotations

import base64
import binascii

from vault.errors import IntegrityError

__all__ = ["BEGIN", "END", "armor", "dearmor", "is_armored"]

BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
END = b"-----END AGE ENCRYPTED FILE-----"
_COLUMNS = 64
_BYTES_PER_LINE = _COLUMNS // 4 * 3
_MAX_WHITESPACE = 1024
# age checks leading bytes with unicode.IsSpace(rune(b)), which also matches NEL and NBSP.
_LEADING_SPACE = frozenset(b" \t\n\v\f\r\x85\xa0")
_TRAILING_SPACE = b" \t\n\v\f\r"


def armor(data: bytes | bytearray | memoryview) -> bytes:
    """Wrap binary age data in ASCII armor."""
    encoded = base64.b64encode(bytes(data))
    lines = [encoded[i : i + _COLUMNS] for i in range(0, len(encoded), _COLUMNS)]
    return b"\n".join([BEGIN, *lines, END]) + b"\n"


def _skip_leading(data: bytes | memoryview) -> int:
    pos = 0
    while pos < len(data) and data[pos] in _LEADING_SPACE:
        pos += 1
        if pos > _MAX_WHITESPACE:
            return -1
    return pos


def is_armored(data: bytes | bytearray | memoryview) -> bool:
    """True if ``data`` (after allowed leading whitespace) starts with the armor line."""
    view = memoryview(data)
    pos = _skip_leading(view[: _MAX_WHITESPACE + 1])
    return pos >= 0 and bytes(view[pos : pos + len(BEGIN)]) == BEGIN


def _decode_line(line: bytes) -> bytes:
    # An empty line is never valid: data that fills its last line is followed directly by
    # the END line (CCTV armor_empty_last_line).
    if not line or len(line) > _COLUMNS or len(line) % 4:
        raise IntegrityError()
    try:
        out = base64.b64decode(line, validate=True)
    except binascii.Error:
        raise IntegrityError() from None
    if base64.b64encode(out) != line:  # canonical: no stray bits, padding only at the end
        raise IntegrityError()
    return out


def dearmor(data: bytes | bytearray | memoryview) -> bytes:
    """Strictly decode armored age data back to binary.

    Raises:
        IntegrityError: anything that is not exactly the armor format.
    """
    raw = bytes(data)
    pos = _skip_leading(raw)
    if pos < 0:
        raise IntegrityError()

    def line() -> bytes:
        nonlocal pos
        if pos >= len(raw):
            raise IntegrityError()
        end = raw.find(b"\n", pos)
        if end < 0:
            out, pos = raw[pos:], len(raw)
        else:
            out, pos = raw[pos:end], end + 1
        return out[:-1] if out.endswith(b"\r") else out

    if line() != BEGIN:
        raise IntegrityError()
    decoded = bytearray()
    while True:
        current = line()
        if current == END:
            break
        chunk = _decode_line(current)
        decoded += chunk
        if len(chunk) < _BYTES_PER_LINE:
            if line() != END:
                raise IntegrityError()
            break
    rest = raw[pos:]
    if len(rest) >= _MAX_WHITESPACE or rest.strip(_TRAILING_SPACE):
        raise IntegrityError()
    return bytes(decoded)
