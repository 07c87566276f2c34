"""age recipient types on `cryptography`: X25519 and scrypt (passphrase).

A *recipient* wraps a 16-byte file key into one stanza; an *identity* tries to unwrap it.
``Identity.unwrap`` returns ``None`` for "not mine, try the next" (age's
``ErrIncorrectIdentity``) and raises :class:`IntegrityError` when a stanza of its own type
is malformed, so a broken file is never mistaken for a file sealed to someone else.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from vault.errors import IntegrityError

from . import bech32
from .format import Stanza, b64decode, b64encode

__all__ = [
    "FILE_KEY_SIZE",
    "Recipient",
    "Identity",
    "X25519Recipient",
    "X25519Identity",
    "ScryptRecipient",
    "ScryptIdentity",
]

FILE_KEY_SIZE = 16
_ZERO_NONCE = bytes(12)
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
_SCRYPT_SALT_SIZE = 16
MAX_SCRYPT_WORK_FACTOR = 22  # age's default limit: 2**22 * 1 KiB = 4 GiB of memory


@runtime_checkable
class Recipient(Protocol):
    """Wraps a file key for one reader."""

    def wrap(self, file_key: bytes) -> list[Stanza]: ...


@runtime_checkable
class Identity(Protocol):
    """Unwraps a file key from a header's stanzas, or returns None if none is addressed to it."""

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None: ...


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _wrap_key(key: bytes, file_key: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, file_key, None)


def _unwrap_key(key: bytes, body: bytes) -> bytes | None:
    """Decrypt a wrapped file key. Wrong size is malformed; a bad tag means "not ours"."""
    if len(body) != FILE_KEY_SIZE + 16:  # checked before decrypting, as the spec requires
        raise IntegrityError()
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, body, None)
    except InvalidTag:
        return None


def _decode_share(arg: str) -> bytes:
    try:
        share = b64decode(arg)
    except ValueError:
        raise IntegrityError() from None
    if len(share) != 32:
        raise IntegrityError()
    return share


class X25519Recipient:
    """An ``age1...`` public key."""

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != 32:
            raise ValueError("an X25519 public key is 32 bytes")
        self._public = bytes(public_key)

    @classmethod
    def from_string(cls, s: str) -> X25519Recipient:
        """Parse ``age1...``. Raises ValueError if malformed."""
        if s.lower() != s:
            raise ValueError("malformed age recipient: must be lowercase")
        hrp, data = bech32.decode(s)
        if hrp != "age" or len(data) != 32:
            raise ValueError("malformed age X25519 recipient")
        return cls(data)

    def to_string(self) -> str:
        return bech32.encode("age", self._public)

    @property
    def public_bytes(self) -> bytes:
        return self._public

    def wrap(self, file_key: bytes) -> list[Stanza]:
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(self._public))
        except ValueError:
            raise ValueError("invalid X25519 recipient (low-order point)") from None
        key = _hkdf(shared, share + self._public, _X25519_LABEL)
        return [Stanza("X25519", (b64encode(share),), _wrap_key(key, file_key))]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, X25519Recipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"X25519Recipient({self.to_string()!r})"


class X25519Identity:
    """An ``AGE-SECRET-KEY-1...`` secret key. Its repr never shows the secret."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._private = private_key
        self._public = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_string(cls, s: str) -> X25519Identity:
        """Parse ``AGE-SECRET-KEY-1...``. Raises ValueError if malformed."""
        if s.upper() != s:
            raise ValueError("malformed age identity: must be uppercase")
        hrp, data = bech32.decode(s)
        if hrp != "age-secret-key-" or len(data) != 32:
            raise ValueError("malformed age X25519 identity")
        return cls(X25519PrivateKey.from_private_bytes(data))

    def to_string(self) -> str:
        raw = self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return bech32.encode("age-secret-key-", raw).upper()

    @property
    def recipient(self) -> X25519Recipient:
        return X25519Recipient(self._public)

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != "X25519":
                continue
            if len(stanza.args) != 1:
                raise IntegrityError()
            share = _decode_share(stanza.args[0])
            try:
                shared = self._private.exchange(X25519PublicKey.from_public_bytes(share))
            except ValueError:  # all-zero shared secret: identity or low-order point
                raise IntegrityError() from None
            key = _hkdf(shared, share + self._public, _X25519_LABEL)
            file_key = _unwrap_key(key, stanza.body)
            if file_key is not None:
                return file_key
        return None

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self.recipient.to_string()!r})"


def _check_work_factor(work_factor: int) -> None:
    if not isinstance(work_factor, int) or not 1 <= work_factor <= MAX_SCRYPT_WORK_FACTOR:
        raise ValueError(f"scrypt work factor must be an integer in 1..{MAX_SCRYPT_WORK_FACTOR}")


def _scrypt_key(passphrase: bytes, salt: bytes, work_factor: int) -> bytes:
    kdf = Scrypt(salt=_SCRYPT_LABEL + salt, length=32, n=1 << work_factor, r=8, p=1)
    return kdf.derive(passphrase)


class ScryptRecipient:
    """A passphrase. Its stanza must be the only one in a header (age's rule)."""

    must_be_alone = True

    def __init__(self, passphrase: bytes, work_factor: int = 18) -> None:
        if not isinstance(passphrase, (bytes, bytearray)) or not passphrase:
            raise ValueError("the passphrase must be non-empty bytes")
        _check_work_factor(work_factor)
        self._passphrase = bytes(passphrase)
        self.work_factor = work_factor

    def wrap(self, file_key: bytes) -> list[Stanza]:
        salt = os.urandom(_SCRYPT_SALT_SIZE)
        key = _scrypt_key(self._passphrase, salt, self.work_factor)
        return [Stanza("scrypt", (b64encode(salt), str(self.work_factor)), _wrap_key(key, file_key))]

    def __repr__(self) -> str:
        return f"ScryptRecipient(work_factor={self.work_factor})"


class ScryptIdentity:
    """A passphrase for decryption, refusing work factors above ``max_work_factor``."""

    def __init__(self, passphrase: bytes, *, max_work_factor: int = MAX_SCRYPT_WORK_FACTOR) -> None:
        if not isinstance(passphrase, (bytes, bytearray)):
            raise TypeError("the passphrase must be bytes")
        _check_work_factor(max_work_factor)
        self._passphrase = bytes(passphrase)
        self.max_work_factor = max_work_factor

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != "scrypt":
                continue
            if len(stanzas) != 1 or len(stanza.args) != 2:
                raise IntegrityError()
            try:
                salt = b64decode(stanza.args[0])
            except ValueError:
                raise IntegrityError() from None
            factor = stanza.args[1]
            # Decimal, no sign, no leading zero; the length cap keeps int() cheap.
            if len(salt) != _SCRYPT_SALT_SIZE or not factor.isascii() or not factor.isdigit() \
                    or factor[0] == "0" or len(factor) > 2:
                raise IntegrityError()
            work_factor = int(factor)
            if work_factor > self.max_work_factor:
                raise IntegrityError()
            if len(stanza.body) != FILE_KEY_SIZE + 16:
                raise IntegrityError()
            return _unwrap_key(_scrypt_key(self._passphrase, salt, work_factor), stanza.body)
        return None

    def __repr__(self) -> str:
        return "ScryptIdentity(<passphrase>)"
