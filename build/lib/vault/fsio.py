"""Crash-safe file writes, the vault's advisory lock, and best-effort secure removal.

Every file vault writes goes through :func:`atomic_write`: a temporary file in the same
directory, created ``0600`` with ``os.open(O_EXCL)``, written, ``fsync``ed, renamed over the
target, and then the directory is ``fsync``ed so the rename itself is durable. A reader
therefore sees either the old file or the new one, never a torn one.

:func:`crash_point` is a test seam: when ``VAULT_TEST_CRASH_AT`` names a point, the process
kills itself with SIGKILL right there, so tests/test_crash.py can prove that a kill at every
step of ``add`` and ``rotate`` leaves the vault openable with no adapter lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from vault.errors import DiskFullError, LockedError, VaultError

__all__ = ["atomic_write", "fsync_dir", "vault_lock", "secure_remove", "crash_point", "TMP_SUFFIX"]

TMP_SUFFIX = ".tmp"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_CRASH_ENV = "VAULT_TEST_CRASH_AT"
_crash_hits: Counter[str] = Counter()

Writer = Callable[[BinaryIO], object]


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if ``$VAULT_TEST_CRASH_AT`` selects this point.

    ``VAULT_TEST_CRASH_AT=name`` fires at the first pass through ``name``;
    ``name#k`` fires at the k-th pass (e.g. the 3rd file re-wrapped by rotate).
    Unset (always, outside tests) this is a dictionary lookup and nothing else.
    """
    wanted = os.environ.get(_CRASH_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_hits[name] += 1
    if _crash_hits[name] == (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or unlink inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _io_error(action: str, path: Path, exc: OSError) -> VaultError:
    if exc.errno in _DISK_FULL:
        return DiskFullError(f"the disk is full while {action} {path.name}; nothing was changed")
    return VaultError(f"failed {action} {path}: {exc.strerror or exc}")


def atomic_write(path: Path | str, data: bytes | bytearray | memoryview | Writer, *, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data`` (bytes-like, or a callable that writes to a binary file).

    Args:
        path: the target; its directory must exist.
        data: the new content, or ``writer(fileobj)`` that streams it (e.g. ``age.encrypt_to_file``).
        mode: permission bits of the new file (default ``0600``), applied at creation time.

    Raises:
        DiskFullError: ENOSPC/EDQUOT/EFBIG; the temporary file is removed and ``path`` is untouched.
        VaultError: any other I/O failure, also leaving ``path`` untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise _io_error("creating a temporary file for", path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it; never widen beyond `mode`
            os.fsync(fh.fileno())
        crash_point("fsio:before-rename")
        os.replace(tmp, path)
        crash_point("fsio:after-rename")
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise _io_error("writing", path, exc) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def vault_lock(home: Path | str, *, timeout: float = 30.0, poll: float = 0.05) -> Iterator[None]:
    """Hold the vault's advisory lock (``flock`` on ``home/.lock``) for the duration of the block.

    Advisory: it orders vault processes against each other; it does not stop other programs.
    The kernel drops the lock when the process dies, so a killed ``vault`` never wedges the vault.

    Raises:
        LockedError: another process held the lock for longer than ``timeout`` seconds.
    """
    lock_path = Path(home) / ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise _io_error("opening the lock file", lock_path, exc) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"the vault is busy: another vault command has held its lock for over {timeout:.0f} s"
                    ) from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def secure_remove(path: Path | str) -> None:
    """Overwrite a file with zeros, fsync it, unlink it, and fsync its directory. Best effort only.

    This is NOT reliable on copy-on-write filesystems (btrfs, ZFS, APFS), on SSDs (wear levelling
    and the FTL keep old blocks), under snapshots, or when backups already hold a copy: there the
    old bytes can survive. Treat a plaintext that ever touched such a disk as exposed.

    Raises:
        VaultError: the file could not be overwritten or removed.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            remaining = os.fstat(fd).st_size
            zeros = bytes(1 << 20)
            while remaining > 0:
                remaining -= os.write(fd, zeros[: min(remaining, len(zeros))])
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        fsync_dir(path.parent)
    except OSError as exc:
        raise _io_error("securely removing", path, exc) from exc
