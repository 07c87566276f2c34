"""age v1 (age-encryption.org/v1) on `cryptography` primitives.

Interoperable with the ``age`` CLI, rage/pyrage and every implementation that passes the
C2SP CCTV age vectors. Nothing here is vault-specific.

    ident = X25519Identity.generate()
    sealed = encrypt(data, [ident.recipient])
    assert decrypt(sealed, [ident]) == data

Errors: :class:`~vault.errors.NoIdentityError` when no identity can unwrap the file key
(sealed to someone else); one opaque :class:`~vault.errors.IntegrityError` for everything
else (malformed or truncated file, bad MAC, bad chunk). Bad arguments are ValueError.
"""

from __future__ import annotations

from .armor import armor, dearmor, is_armored
from .crypt import decrypt, decrypt_file, encrypt, encrypt_to_file, payload_size, rewrap
from .pq import HybridIdentity, HybridRecipient
from .recipients import (
    Identity,
    Recipient,
    ScryptIdentity,
    ScryptRecipient,
    X25519Identity,
    X25519Recipient,
)

__all__ = [
    "Identity",
    "Recipient",
    "X25519Identity",
    "X25519Recipient",
    "ScryptIdentity",
    "ScryptRecipient",
    "HybridIdentity",
    "HybridRecipient",
    "parse_identity",
    "parse_recipient",
    "encrypt",
    "encrypt_to_file",
    "decrypt",
    "decrypt_file",
    "payload_size",
    "rewrap",
    "armor",
    "dearmor",
    "is_armored",
]


def parse_recipient(s: str) -> Recipient:
    """Parse a recipient string (``age1...`` X25519, ``age1pq1...`` post-quantum hybrid).

    Raises:
        ValueError: not a recipient type we support, or malformed.
    """
    s = s.strip()
    if s.startswith("age1pq1"):
        return HybridRecipient.from_string(s)
    if s.startswith("age1"):
        return X25519Recipient.from_string(s)
    raise ValueError("unsupported or malformed age recipient")


def parse_identity(s: str) -> Identity:
    """Parse an identity string (``AGE-SECRET-KEY-1...``, ``AGE-SECRET-KEY-PQ-1...``).

    Raises:
        ValueError: not an identity type we support, or malformed.
    """
    s = s.strip()
    if s.startswith("AGE-SECRET-KEY-PQ-1"):
        return HybridIdentity.from_string(s)
    if s.startswith("AGE-SECRET-KEY-1"):
        return X25519Identity.from_string(s)
    raise ValueError("unsupported or malformed age identity")
