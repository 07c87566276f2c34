"""Memory-only files and best-effort process hardening.

llama.cpp loads adapters only from a path. A sealed ``memfd_create`` file gives it a path
(``/proc/self/fd/N``) whose bytes live in anonymous memory: nothing is written to a file
system, and the descriptor is close-on-exec so no child process inherits it.

Hardening is best effort and reported, never assumed: core dumps off (``RLIMIT_CORE=0``),
``PR_SET_DUMPABLE=0`` (no core, no ptrace attach by same-uid processes, /proc/self/mem
closed to others), and ``mlock`` on the plaintext buffers so they are not swapped out.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
from dataclasses import dataclass

from vault.errors import EngineError

__all__ = ["MemFile", "Hardening", "harden", "lock_buffer", "unlock_buffer", "zero"]

_PR_SET_DUMPABLE = 4
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc; find_library would spawn ldconfig
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.mlockall.argtypes = [ctypes.c_int]


class MemFile:
    """A sealed, close-on-exec in-memory file holding ``data``; use as a context manager.

    ``path`` (``/proc/self/fd/N``) is valid until :meth:`close`. Close it as soon as the
    consumer has read it: the kernel frees the pages when the last reference goes.

    Raises:
        EngineError: memfd_create or sealing is not available (not Linux, old kernel).
    """

    def __init__(self, data: bytes | bytearray | memoryview, *, name: str = "vault-adapter") -> None:
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError) as exc:
            raise EngineError(f"failed to create an in-memory file: {exc}") from exc
        try:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.write(self.fd, view[written:])
            fcntl_seal(self.fd)
        except OSError as exc:
            os.close(self.fd)
            raise EngineError(f"failed to write the in-memory file: {exc}") from exc
        self.size = len(view)

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "MemFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fcntl_seal(fd: int) -> None:
    """Forbid any further write, shrink or grow, and forbid changing the seals."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)


@dataclass(frozen=True)
class Hardening:
    """What :func:`harden` managed to do; each field is True only if the call succeeded."""

    core_dumps_off: bool
    not_dumpable: bool
    mlockall: bool

    def to_json(self) -> dict[str, bool]:
        return {"core_dumps_off": self.core_dumps_off, "not_dumpable": self.not_dumpable, "mlockall": self.mlockall}


def harden(*, lock_all: bool = False) -> Hardening:
    """Turn off core dumps and make the process non-dumpable; optionally ``mlockall``.

    ``lock_all`` locks current and future pages: it is only attempted when RLIMIT_MEMLOCK
    is unlimited, because with a finite limit MCL_FUTURE makes later large allocations
    (the base model, the KV cache) fail. Plaintext buffers are locked individually with
    :func:`lock_buffer` instead.
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        core_off = True
    except (ValueError, OSError):
        core_off = False
    not_dumpable = _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    locked = False
    if lock_all and resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == resource.RLIM_INFINITY:
        locked = _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) == 0
    return Hardening(core_off, not_dumpable, locked)


def _address(buf: bytearray) -> tuple[int, int]:
    if not isinstance(buf, bytearray):
        raise TypeError("only a bytearray can be locked or zeroed in place")
    if not buf:
        return 0, 0
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)), len(buf)


def lock_buffer(buf: bytearray) -> bool:
    """mlock the pages of ``buf`` so they are never swapped out; False if the OS refused."""
    addr, size = _address(buf)
    return size > 0 and _libc.mlock(addr, size) == 0


def unlock_buffer(buf: bytearray) -> None:
    addr, size = _address(buf)
    if size:
        _libc.munlock(addr, size)


def zero(buf: bytearray | memoryview | None) -> None:
    """Overwrite a writable buffer with zeros in place (bytes objects cannot be zeroed)."""
    if buf is None:
        return
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise TypeError("cannot zero a read-only buffer")
    if len(view):
        ctypes.memset((ctypes.c_char * len(view)).from_buffer(view), 0, len(view))
