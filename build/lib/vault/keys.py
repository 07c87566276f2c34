"""Secrets in the OS keyring (Secret Service, macOS Keychain, Windows Credential Locker).

A :class:`KeyStore` holds the named secrets of one vault under the keyring service
``vault:<vault_id>``: the device identity (``AGE-SECRET-KEY-1...``) and, for other parts of
vault, the signing key, the serve token and the audit MAC key. Nothing here touches the disk.

Backend failures become two user-facing errors: :class:`KeyringMissingError` (no backend, or
the Secret Service is not reachable on D-Bus) and :class:`KeyringLockedError` (the keyring is
locked and the unlock prompt was refused or could not be shown).
"""

from __future__ import annotations

from typing import Any

import keyring
import keyring.backend
import keyring.errors
from keyring.backends import chainer, fail

from vault.errors import KeyringLockedError, KeyringMissingError

__all__ = ["KeyStore", "DEVICE_IDENTITY", "DEVICE_IDENTITY_NEXT", "backend_name"]

DEVICE_IDENTITY = "device-identity"
DEVICE_IDENTITY_NEXT = "device-identity-next"  # exists only while a rotate/recover is in flight

_MAX_NAME = 128


def _missing(detail: str) -> KeyringMissingError:
    return KeyringMissingError(f"{KeyringMissingError.default_message} ({detail})")


def _secretstorage_errors() -> tuple[type[BaseException], ...]:
    try:
        import secretstorage.exceptions as exc  # the Secret Service backend raises these unwrapped
    except ImportError:
        return ()
    return (exc.SecretStorageException,)


def _resolve_backend(backend: keyring.backend.KeyringBackend | None) -> keyring.backend.KeyringBackend:
    kr = backend if backend is not None else keyring.get_keyring()
    if isinstance(kr, fail.Keyring) or (isinstance(kr, chainer.ChainerBackend) and not kr.backends):
        raise _missing("no keyring backend found")
    return kr


def backend_name(backend: keyring.backend.KeyringBackend | None = None) -> str:
    """Human name of the keyring backend in use, e.g. 'SecretService Keyring'.

    Raises:
        KeyringMissingError: there is no usable backend.
    """
    kr = _resolve_backend(backend)
    return f"{type(kr).__module__.rsplit('.', 1)[-1]} {type(kr).__name__}"


class KeyStore:
    """Named secrets of one vault in the OS keyring.

    Args:
        vault_id: namespaces the secrets (keyring service ``vault:<vault_id>``).
        backend: a ``keyring`` backend; default: whatever ``keyring.get_keyring()`` picks,
            resolved at each call so tests and ``PYTHON_KEYRING_BACKEND`` take effect.
    """

    def __init__(self, vault_id: str, backend: keyring.backend.KeyringBackend | None = None) -> None:
        if not vault_id or not vault_id.isascii() or not vault_id.replace("-", "").isalnum():
            raise ValueError(f"invalid vault id {vault_id!r}")
        self.vault_id = vault_id
        self.backend = backend
        self.service = f"vault:{vault_id}"

    def with_vault_id(self, vault_id: str) -> "KeyStore":
        """The same backend, namespaced for another vault."""
        return KeyStore(vault_id, self.backend)

    def get(self, name: str) -> str | None:
        """The secret stored under ``name``, or None if there is none."""
        return self._call("reading", name, lambda kr: kr.get_password(self.service, _check(name)))

    def set(self, name: str, value: str) -> None:
        """Store (or replace) the secret ``name``."""
        if not isinstance(value, str) or not value:
            raise ValueError("a secret must be a non-empty str")
        self._call("storing", name, lambda kr: kr.set_password(self.service, _check(name), value))

    def delete(self, name: str) -> bool:
        """Delete the secret ``name``; returns False if it did not exist."""

        def _delete(kr: keyring.backend.KeyringBackend) -> bool:
            if kr.get_password(self.service, _check(name)) is None:
                return False
            kr.delete_password(self.service, name)
            return True

        return self._call("deleting", name, _delete)

    def check(self) -> str:
        """Prove the keyring answers and is unlocked (a read of a name that need not exist).

        Returns:
            the backend's name.
        """
        self.get("probe")
        return backend_name(self.backend)

    def _call(self, action: str, name: str, fn: Any) -> Any:
        kr = _resolve_backend(self.backend)
        try:
            return fn(kr)
        except keyring.errors.KeyringLocked as exc:
            raise KeyringLockedError(
                f"the OS keyring is locked and was not unlocked while {action} {name!r}; unlock it and try again"
            ) from exc
        except (keyring.errors.NoKeyringError, keyring.errors.InitError) as exc:
            raise _missing(str(exc).strip().rstrip(".")) from exc
        except keyring.errors.PasswordDeleteError as exc:
            raise KeyringLockedError(f"the OS keyring refused deleting {name!r}: {exc}") from exc
        except keyring.errors.PasswordSetError as exc:
            raise KeyringLockedError(f"the OS keyring refused storing {name!r}: {exc}") from exc
        except _secretstorage_errors() as exc:
            if "locked" in str(exc).lower():
                raise KeyringLockedError(f"the OS keyring is locked ({exc})") from exc
            raise _missing(f"the Secret Service is not reachable on D-Bus: {exc}") from exc
        except (ConnectionError, OSError) as exc:  # D-Bus socket gone mid-call
            raise _missing(f"the keyring connection failed: {exc}") from exc


def _check(name: str) -> str:
    if not name or len(name) > _MAX_NAME or not name.isprintable():
        raise ValueError(f"invalid secret name {name!r}")
    return name
