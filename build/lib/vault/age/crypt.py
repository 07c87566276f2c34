"""Encrypt and decrypt whole age v1 files; re-wrap a file key for new recipients.

Decryption order, as in age: parse the header (strict, bounded) -> find a stanza one of
our identities can unwrap (none: :class:`NoIdentityError`) -> check the header MAC in
constant time -> derive the payload key -> authenticate and decrypt every STREAM chunk.
Every failure after "no identity" is one opaque :class:`IntegrityError`.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.errors import IntegrityError, NoIdentityError

from . import stream
from .armor import armor as _armor_encode
from .armor import dearmor as _dearmor
from .armor import is_armored as _is_armored
from .format import Header, Stanza, finish_header, parse_header, serialize_header
from .recipients import FILE_KEY_SIZE, Identity, Recipient

__all__ = [
    "encrypt",
    "encrypt_to_file",
    "decrypt",
    "decrypt_file",
    "payload_size",
    "rewrap",
    "unwrap_file_key",
    "verify_header_mac",
]

BytesLike = Union[bytes, bytearray, memoryview]
PathLike = Union[str, "os.PathLike[str]"]
_STREAM_BLOCK = 64 * stream.CHUNK_SIZE  # 4 MiB per write when streaming to a file


def _header_mac(file_key: bytes, mac_input: bytes) -> hmac.HMAC:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"", info=b"header").derive(file_key)
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(mac_input)
    return mac


def _as_list(items: object, kind: type) -> list:
    if isinstance(items, kind):
        return [items]
    result = list(items)  # type: ignore[call-overload]
    if not result:
        raise ValueError(f"at least one {kind.__name__.lower()} is required")
    for item in result:
        if not isinstance(item, kind):
            raise TypeError(f"expected an age {kind.__name__}, got {type(item).__name__}")
    return result


def _make_header(file_key: bytes, recipients: Iterable[Recipient] | Recipient) -> bytes:
    recipients = _as_list(recipients, Recipient)
    if len(recipients) > 1 and any(getattr(r, "must_be_alone", False) for r in recipients):
        raise ValueError("a passphrase (scrypt) recipient cannot be combined with other recipients")
    # As age 1.3: a post-quantum file must not also be openable by a classic key, which
    # would make the post-quantum protection pointless.
    if len({frozenset(getattr(r, "labels", ())) for r in recipients}) > 1:
        raise ValueError("post-quantum and classic recipients cannot be mixed in one file")
    stanzas: list[Stanza] = []
    for r in recipients:
        stanzas.extend(r.wrap(file_key))
    mac_input = serialize_header(stanzas)
    return finish_header(mac_input, _header_mac(file_key, mac_input).finalize())


def unwrap_file_key(header: Header, identities: Iterable[Identity] | Identity) -> bytes:
    """Find the file key: try each identity against every stanza, in order.

    Raises:
        IntegrityError: a malformed stanza of a type one of the identities handles, or a
            scrypt stanza that is not alone.
        NoIdentityError: no identity could unwrap any stanza.
    """
    identities = _as_list(identities, Identity)
    if len(header.stanzas) > 1 and any(s.type == "scrypt" for s in header.stanzas):
        raise IntegrityError()
    for identity in identities:
        file_key = identity.unwrap(header.stanzas)
        if file_key is not None:
            if len(file_key) != FILE_KEY_SIZE:
                raise IntegrityError()
            return file_key
    raise NoIdentityError()


def verify_header_mac(header: Header, file_key: bytes) -> None:
    """Constant-time check of the header MAC. Raises IntegrityError on mismatch."""
    try:
        _header_mac(file_key, header.mac_input).verify(header.mac)
    except InvalidSignature:
        raise IntegrityError() from None


def _open_header(buf: memoryview, identities: Iterable[Identity] | Identity) -> tuple[bytes, memoryview]:
    """Header checks; returns (file key, the payload: nonce + STREAM)."""
    header, offset = parse_header(buf)
    file_key = unwrap_file_key(header, identities)
    verify_header_mac(header, file_key)
    if len(buf) - offset < stream.NONCE_SIZE:  # the nonce is read with the header
        raise IntegrityError()
    return file_key, buf[offset:]


def _open(buf: memoryview, identities: Iterable[Identity] | Identity) -> tuple[bytes, memoryview]:
    """Header checks; returns (payload key, STREAM ciphertext view)."""
    file_key, payload = _open_header(buf, identities)
    nonce = payload[: stream.NONCE_SIZE]
    return stream.payload_key(file_key, nonce), payload[stream.NONCE_SIZE :]


def _binary_view(data: BytesLike) -> memoryview:
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    if _is_armored(view):
        return memoryview(_dearmor(view))
    return view


def encrypt(plaintext: BytesLike, recipients: Iterable[Recipient] | Recipient, *, armor: bool = False) -> bytes:
    """Encrypt ``plaintext`` to ``recipients`` (a fresh random file key), returning the age file.

    Raises:
        ValueError: no recipients, or a scrypt recipient mixed with others.
    """
    src = memoryview(plaintext).cast("B")
    file_key = os.urandom(FILE_KEY_SIZE)
    header = _make_header(file_key, recipients)
    nonce = os.urandom(stream.NONCE_SIZE)
    prefix = len(header) + stream.NONCE_SIZE
    out = stream.alloc(prefix + stream.ciphertext_size(len(src)))  # every byte is written below
    out[: len(header)] = header
    out[len(header) : prefix] = nonce
    stream.encrypt_into(stream.payload_key(file_key, nonce), src, memoryview(out)[prefix:])
    return _armor_encode(out) if armor else bytes(out)


def encrypt_to_file(fileobj: BinaryIO, plaintext: BytesLike, recipients: Iterable[Recipient] | Recipient) -> None:
    """Encrypt ``plaintext`` into an open binary file, 4 MiB at a time (bounded extra memory).

    Encryption of the next block overlaps the write of the current one (both release the GIL).
    """
    src = memoryview(plaintext).cast("B")
    file_key = os.urandom(FILE_KEY_SIZE)
    fileobj.write(_make_header(file_key, recipients))
    nonce = os.urandom(stream.NONCE_SIZE)
    fileobj.write(nonce)
    key = stream.payload_key(file_key, nonce)
    # Every block but the last is whole chunks, none flagged final; the last may be empty.
    starts = list(range(0, len(src), _STREAM_BLOCK)) or [0]
    enc_block = _STREAM_BLOCK // stream.CHUNK_SIZE * stream.ENC_CHUNK_SIZE
    buffers = [memoryview(stream.alloc(enc_block)) for _ in range(min(2, len(starts)))]

    def seal_block(n: int) -> memoryview:
        off = starts[n]
        part = src[off : off + _STREAM_BLOCK]
        final = n == len(starts) - 1
        out = buffers[n % 2][: stream.ciphertext_size(len(part)) if final else enc_block]
        stream.encrypt_into(key, part, out, first_chunk=off // stream.CHUNK_SIZE, final=final)
        return out

    if len(starts) == 1:
        fileobj.write(seal_block(0))
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(seal_block, 0)
        for n in range(len(starts)):
            ready = pending.result()
            if n + 1 < len(starts):
                pending = pool.submit(seal_block, n + 1)  # fills the other buffer
            fileobj.write(ready)


def decrypt(ciphertext: BytesLike, identities: Iterable[Identity] | Identity) -> bytearray:
    """Decrypt an age file (binary or armored) held in memory.

    Raises:
        NoIdentityError: no identity matches (sealed to another key).
        IntegrityError: anything else wrong with the file.
    """
    key, body = _open(_binary_view(ciphertext), identities)
    out = stream.alloc(stream.plaintext_size(len(body)))
    stream.decrypt_into(key, body, memoryview(out))
    return out


def _close(mm: mmap.mmap) -> None:
    """Unmap now if no view of the mapping survives (a traceback may hold one; then GC does it)."""
    try:
        mm.close()
    except BufferError:
        pass


# Pre-fault the whole (page-cached) file in one call instead of one fault per page.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map(path: PathLike) -> mmap.mmap:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise IntegrityError()
        return mmap.mmap(f.fileno(), 0, flags=_MAP_FLAGS, prot=mmap.PROT_READ)


def decrypt_file(path: PathLike, identities: Iterable[Identity] | Identity, *,
                 out: bytearray | memoryview | None = None) -> bytearray | memoryview:
    """Decrypt the age file at ``path`` into memory, never writing plaintext to disk.

    The file is mmapped and chunks are authenticated and decrypted straight into ``out``
    (a writable buffer of exactly :func:`payload_size` bytes, e.g. a memfd mapping) or into
    a new bytearray. On failure ``out`` is wiped.

    Returns:
        ``out`` if given, else a new bytearray holding the payload.
    Raises:
        NoIdentityError, IntegrityError: as :func:`decrypt`.
        ValueError: ``out`` has the wrong size; OSError: the file cannot be read.
    """
    mm = _map(path)
    try:
        view = memoryview(mm)
        try:
            if _is_armored(view):
                return _into(decrypt(view, identities), out)
            key, body = _open(view, identities)
            size = stream.plaintext_size(len(body))
            target = stream.alloc(size) if out is None else out
            stream.decrypt_into(key, body, memoryview(target).cast("B"))
            return target
        finally:
            del view
    finally:
        _close(mm)


def _into(plaintext: bytearray, out: bytearray | memoryview | None) -> bytearray | memoryview:
    if out is None:
        return plaintext
    try:
        target = memoryview(out).cast("B")
        if len(target) != len(plaintext):
            raise ValueError(f"output buffer must be {len(plaintext)} bytes, got {len(target)}")
        target[:] = plaintext
        return out
    finally:
        stream.wipe(memoryview(plaintext))


def payload_size(path_or_bytes: PathLike | BytesLike) -> int:
    """Size of the payload of an age file, from its header and length alone (no key).

    Raises:
        IntegrityError: the file is not a structurally valid age file.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        view = _binary_view(path_or_bytes)
        _, offset = parse_header(view)
        return stream.plaintext_size(len(view) - offset - stream.NONCE_SIZE)
    mm = _map(path_or_bytes)
    try:
        return payload_size(memoryview(mm))
    finally:
        _close(mm)


def rewrap(ciphertext: PathLike | BytesLike, identities: Iterable[Identity] | Identity,
           recipients: Iterable[Recipient] | Recipient, *, verify: bool = True) -> bytes:
    """Re-encrypt the file key of an age file to new recipients; the payload is unchanged.

    The old stanzas are dropped, so old identities can no longer open the result. With
    ``verify`` (the default) every payload chunk is authenticated first, so a damaged file
    is never re-wrapped and then trusted.

    Raises:
        NoIdentityError, IntegrityError: as :func:`decrypt`; ValueError: bad recipients.
    """
    if isinstance(ciphertext, (bytes, bytearray, memoryview)):
        return _rewrap(_binary_view(ciphertext), identities, recipients, verify)
    mm = _map(ciphertext)
    try:
        return _rewrap(_binary_view(memoryview(mm)), identities, recipients, verify)
    finally:
        _close(mm)


def _rewrap(view: memoryview, identities: Iterable[Identity] | Identity,
            recipients: Iterable[Recipient] | Recipient, verify: bool) -> bytes:
    file_key, payload = _open_header(view, identities)
    if verify:
        key = stream.payload_key(file_key, payload[: stream.NONCE_SIZE])
        _verify_stream(key, payload[stream.NONCE_SIZE :])
    return b"".join((_make_header(file_key, recipients), payload))


def _verify_stream(key: bytes, body: memoryview) -> None:
    """Authenticate every chunk, 4 MiB at a time, into a scratch buffer wiped afterwards."""
    stream.plaintext_size(len(body))
    scratch = bytearray(_STREAM_BLOCK)
    enc_block = _STREAM_BLOCK // stream.CHUNK_SIZE * stream.ENC_CHUNK_SIZE
    try:
        for off in range(0, len(body), enc_block):
            part = body[off : off + enc_block]
            final = off + enc_block >= len(body)
            size = stream.plaintext_size(len(part)) if final else _STREAM_BLOCK
            stream.decrypt_into(key, part, memoryview(scratch)[:size],
                                first_chunk=off // stream.ENC_CHUNK_SIZE, final=final)
    finally:
        stream.wipe(memoryview(scratch))
