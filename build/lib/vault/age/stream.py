"""age's STREAM payload: 64 KiB chunks of ChaCha20-Poly1305 with a last-chunk flag.

Chunk ``i`` is sealed under nonce ``i`` (11 bytes, big-endian) followed by one byte that is
1 for the final chunk and 0 otherwise, so truncating or extending a file breaks
authentication. The final chunk may be empty only when the whole payload is empty.

Because we always know the full ciphertext length (a buffer or an mmap), the chunk
boundaries and which chunk is final follow from the length alone; a valid file has exactly
one such parse. Chunks are decrypted straight into the caller's buffer with
``decrypt_into`` and, for large payloads, split across threads (``cryptography`` releases
the GIL inside the cipher). ``decrypt_into`` writes plaintext before it checks the tag, so
on any failure the whole output buffer is wiped before :class:`IntegrityError` is raised:
no byte of an unauthenticated chunk ever reaches a caller.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.errors import IntegrityError

__all__ = [
    "CHUNK_SIZE",
    "ENC_CHUNK_SIZE",
    "TAG_SIZE",
    "NONCE_SIZE",
    "payload_key",
    "plaintext_size",
    "ciphertext_size",
    "decrypt_into",
    "encrypt_into",
    "wipe",
    "alloc",
]

CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
ENC_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
NONCE_SIZE = 16  # the per-file random nonce that salts the payload key
_PARALLEL_MIN_CHUNKS = 32  # below ~2 MiB a second thread costs more than it saves
_WIPE_BLOCK = bytes(1 << 20)


def payload_key(file_key: bytes, nonce: bytes | memoryview) -> bytes:
    """HKDF-SHA-256(ikm=file key, salt=nonce, info="payload")."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(nonce), info=b"payload").derive(file_key)


def plaintext_size(ciphertext_len: int) -> int:
    """Payload size for ``ciphertext_len`` bytes of STREAM (after the 16-byte nonce).

    Raises:
        IntegrityError: no chunk at all, a final chunk shorter than a tag, or an empty
            final chunk after a full one.
    """
    if ciphertext_len <= 0:
        raise IntegrityError()
    chunks = -(-ciphertext_len // ENC_CHUNK_SIZE)
    last = ciphertext_len - (chunks - 1) * ENC_CHUNK_SIZE
    if last < TAG_SIZE or (chunks > 1 and last == TAG_SIZE):
        raise IntegrityError()
    return ciphertext_len - chunks * TAG_SIZE


def ciphertext_size(plaintext_len: int) -> int:
    """STREAM size (without the nonce) for a payload of ``plaintext_len`` bytes."""
    chunks = max(1, -(-plaintext_len // CHUNK_SIZE))
    return plaintext_len + chunks * TAG_SIZE


def _uninitialized_bytearray():
    if sys.implementation.name != "cpython":
        return None
    make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    return make


_MAKE_BYTEARRAY = _uninitialized_bytearray()


def alloc(size: int) -> bytearray:
    """A bytearray of ``size`` bytes that is *not* zero-filled first.

    ``bytearray(n)`` memsets the whole buffer in one thread, which for a 256 MiB payload
    costs more than the decryption (every page is faulted in and zeroed twice over). Here
    the pages are faulted in by the decrypting threads as they write. Callers must
    overwrite every byte (STREAM output does) or wipe the buffer on failure.
    """
    if _MAKE_BYTEARRAY is None or size < (1 << 20):
        return bytearray(size)
    return _MAKE_BYTEARRAY(None, size)


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise()
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; older kernels answer EINVAL and we just fault lazily
_PAGE = 4096


def prefault(view: memoryview) -> None:
    """Best effort: fault in the pages of a writable buffer with one syscall.

    Faulting a fresh 256 MiB buffer page by page costs about as much as decrypting it; the
    kernel populates a range in one call for roughly two thirds of that. Never changes
    the buffer's contents.
    """
    if _MADVISE is None or len(view) < (1 << 20) or view.readonly:
        return
    anchor = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(anchor)
    del anchor
    start = (address + _PAGE - 1) & ~(_PAGE - 1)
    end = (address + len(view)) & ~(_PAGE - 1)
    if end > start:
        _MADVISE(start, end - start, _MADV_POPULATE_WRITE)


def wipe(buf: memoryview) -> None:
    """Overwrite a writable buffer with zeros."""
    for off in range(0, len(buf), len(_WIPE_BLOCK)):
        n = min(len(_WIPE_BLOCK), len(buf) - off)
        buf[off : off + n] = _WIPE_BLOCK[:n]


def _run(work: Callable[[int, int, threading.Event], None], chunks: int, threads: int) -> None:
    """Run ``work(first, stop, failed)`` over contiguous chunk ranges; re-raise the first error."""
    threads = max(1, min(threads, chunks // _PARALLEL_MIN_CHUNKS or 1))
    failed = threading.Event()
    if threads == 1:
        work(0, chunks, failed)
        return
    errors: list[BaseException] = []
    bounds = [chunks * t // threads for t in range(threads + 1)]

    def target(first: int, stop: int) -> None:
        try:
            work(first, stop, failed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            failed.set()
            errors.append(exc)

    pool = [threading.Thread(target=target, args=(bounds[t], bounds[t + 1])) for t in range(1, threads)]
    for th in pool:
        th.start()
    target(bounds[0], bounds[1])
    for th in pool:
        th.join()
    if errors:
        raise errors[0]


def decrypt_into(key: bytes, src: memoryview, out: memoryview, *, first_chunk: int = 0,
                 final: bool = True, threads: int = 2) -> None:
    """Authenticate and decrypt STREAM ``src`` into ``out`` (exactly the payload size).

    With ``final=False``, ``src`` is a run of whole chunks from the middle of a stream
    starting at chunk number ``first_chunk``, none of them final.

    Raises:
        IntegrityError: any chunk fails to authenticate (``out`` is wiped first).
        ValueError: ``out`` has the wrong size.
    """
    if final:
        size = plaintext_size(len(src))
    elif len(src) % ENC_CHUNK_SIZE:
        raise IntegrityError()
    else:
        size = len(src) - len(src) // ENC_CHUNK_SIZE * TAG_SIZE
    if len(out) != size:
        raise ValueError(f"output buffer must be {size} bytes, got {len(out)}")
    chunks = -(-len(src) // ENC_CHUNK_SIZE)
    aead = ChaCha20Poly1305(key)

    last = chunks - 1 if final else -1

    def work(first: int, stop: int, failed: threading.Event) -> None:
        prefault(out[first * CHUNK_SIZE : stop * CHUNK_SIZE])
        decrypt, stopped = aead.decrypt_into, failed.is_set
        # Hot loop (4096 iterations per 256 MiB): slices clamp at the end, so the short
        # final chunk needs no special case; the nonce is counter << 8 | last flag.
        for i in range(first, stop):
            if stopped():
                return
            nonce = ((first_chunk + i) << 8 | (i == last)).to_bytes(12, "big")
            decrypt(nonce, src[i * ENC_CHUNK_SIZE : (i + 1) * ENC_CHUNK_SIZE], None,
                    out[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE])

    try:
        _run(work, chunks, threads)
    except InvalidTag:
        wipe(out)
        raise IntegrityError() from None
    except BaseException:
        wipe(out)
        raise


def encrypt_into(key: bytes, src: memoryview, out: memoryview, *, first_chunk: int = 0,
                 final: bool = True, threads: int = 2) -> None:
    """Seal ``src`` as STREAM chunks ``first_chunk...`` into ``out``.

    With ``final=False`` the caller continues the stream later: ``src`` must then be a
    whole number of chunks and none of them is flagged last (used to stream to a file).
    """
    if final:
        if len(out) != ciphertext_size(len(src)):
            raise ValueError("output buffer has the wrong size")
        chunks = max(1, -(-len(src) // CHUNK_SIZE))
    else:
        if len(src) % CHUNK_SIZE or len(out) != len(src) + len(src) // CHUNK_SIZE * TAG_SIZE:
            raise ValueError("a non-final block must be whole chunks with a matching output")
        chunks = len(src) // CHUNK_SIZE
    aead = ChaCha20Poly1305(key)

    last = chunks - 1 if final else -1

    def work(first: int, stop: int, failed: threading.Event) -> None:
        encrypt, stopped = aead.encrypt_into, failed.is_set
        for i in range(first, stop):
            if stopped():
                return
            nonce = ((first_chunk + i) << 8 | (i == last)).to_bytes(12, "big")
            encrypt(nonce, src[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE], None,
                    out[i * ENC_CHUNK_SIZE : (i + 1) * ENC_CHUNK_SIZE])

    _run(work, chunks, threads)
