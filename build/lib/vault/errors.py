"""One exception tree for vault and its runtime.

Every error a user can meet is a :class:`VaultError` subclass with a one-line,
lowercase message that says what was being done, and an exit code of its own.
The CLI catches ``VaultError`` in one place and maps it to that code. Caller
mistakes inside the library stay ``ValueError``/``TypeError``.

Authentication and integrity failures are a single opaque :class:`IntegrityError`
so that no caller can build an oracle from which check failed.
"""

from __future__ import annotations

__all__ = [
    "VaultError",
    "UsageError",
    "KeyringMissingError",
    "KeyringLockedError",
    "NotInitializedError",
    "AlreadyInitializedError",
    "NoIdentityError",
    "IntegrityError",
    "UnknownNameError",
    "AlreadyExistsError",
    "InvalidAdapterError",
    "DiskFullError",
    "LockedError",
    "BaseModelError",
    "EngineError",
    "GuardError",
    "AuditRejectedError",
    "LicenceError",
    "SignatureError",
    "BundleError",
    "TrainingError",
]


class VaultError(Exception):
    """Root of every user-facing error. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1
    default_message: str = "vault failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.default_message


class UsageError(VaultError):
    """A request that cannot be carried out as asked (bad option combination, bad value)."""

    exit_code = 2
    default_message = "invalid usage"


class KeyringMissingError(VaultError):
    """No usable OS keyring backend (e.g. no Secret Service on a headless box)."""

    exit_code = 3
    default_message = (
        "no OS keyring is available; on a headless Linux machine start one with: "
        "dbus-run-session -- sh -c 'echo -n pw | gnome-keyring-daemon --unlock --components=secrets; exec $SHELL'"
    )


class KeyringLockedError(VaultError):
    """The keyring exists but is locked, or the user refused to unlock it."""

    exit_code = 4
    default_message = "the OS keyring is locked; unlock it and try again"


class NotInitializedError(VaultError):
    exit_code = 5
    default_message = "no vault here yet; run 'vault init' first"


class AlreadyInitializedError(VaultError):
    exit_code = 5
    default_message = "a vault already exists here"


class NoIdentityError(VaultError):
    """None of our identities can unwrap the file key: sealed to another device."""

    exit_code = 6
    default_message = "this file is sealed to another device or key; use 'vault recover' with the recovery key"


class IntegrityError(VaultError):
    """One opaque error for every authentication, MAC, truncation or tamper failure."""

    exit_code = 7
    default_message = "integrity check failed: the file is damaged, truncated or was tampered with"


class UnknownNameError(VaultError):
    exit_code = 8
    default_message = "no such name in the vault"


class AlreadyExistsError(VaultError):
    exit_code = 9
    default_message = "that name already exists; use --force to replace it"


class InvalidAdapterError(VaultError):
    exit_code = 10
    default_message = "not a valid adapter"


class DiskFullError(VaultError):
    exit_code = 11
    default_message = "the disk is full; nothing was changed"


class LockedError(VaultError):
    """Another vault process holds the lock for too long."""

    exit_code = 12
    default_message = "the vault is busy (another vault command holds its lock)"


class BaseModelError(VaultError):
    """Unknown base model, digest mismatch, or an adapter sealed for another base."""

    exit_code = 13
    default_message = "base model problem"


class EngineError(VaultError):
    exit_code = 14
    default_message = "the inference engine failed"


class GuardError(VaultError):
    exit_code = 15
    default_message = "the guard failed"


class AuditRejectedError(GuardError):
    """The adapter audit rejected an adapter; it is never loaded."""

    exit_code = 16
    default_message = "the adapter audit rejected this adapter; it will not be loaded"


class LicenceError(VaultError):
    """The licence forbids this use, has expired, or is not addressed to us."""

    exit_code = 17
    default_message = "the licence does not permit this"


class SignatureError(VaultError):
    exit_code = 18
    default_message = "signature verification failed"


class BundleError(VaultError):
    exit_code = 19
    default_message = "not a valid bundle"


class TrainingError(VaultError):
    exit_code = 20
    default_message = "training failed"
