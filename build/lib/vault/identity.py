"""The user's sharing identity: an age recipient to receive bundles, an ECDSA P-256 key to sign them.

Both private keys live only in the OS keyring (via :class:`vault.keys.KeyStore`):

- ``signing-key``: ECDSA P-256, PKCS#8 PEM. OpenSSF model-signing accepts only elliptic-curve
  keys for key-based signing (not Ed25519), and P-256 is what its verifier checks by default.
- ``share-identity``: an age X25519 identity used only for bundles addressed to this user. It
  is separate from the device identity so that rotating the device key (``vault rotate``) does
  not invalidate licences already issued to this user's published recipient.

The public half (:class:`PublicIdentity`) is a short text file that can be handed to others:
one ``age1...`` line and one PEM public key. Its key id is the SHA-256 of the canonical PEM,
the same value model-signing writes as the key hint in ``model.sig``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vault.errors import IntegrityError, UsageError

__all__ = [
    "SIGNING_KEY",
    "SHARE_IDENTITY",
    "MAX_IDENTITY_BYTES",
    "PublicIdentity",
    "Identity",
    "load_identity",
    "key_id_of",
]

SIGNING_KEY = "signing-key"
SHARE_IDENTITY = "share-identity"
MAX_IDENTITY_BYTES = 8 * 1024
_HEADER = "# vault public identity v1"
_RECIPIENT = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----\r?\n[A-Za-z0-9+/=\r\n]+-----END PUBLIC KEY-----")


def _canonical_pem(public_key: ec.EllipticCurvePublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_id_of(pem: str) -> str:
    """SHA-256 hex of a canonical PEM public key (equal to model-signing's key hint)."""
    return hashlib.sha256(pem.encode("ascii")).hexdigest()


def _load_public_key(pem_text: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem_text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise UsageError("the signing key is not a readable PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError("the signing key must be an ECDSA P-256 public key")
    return key


@dataclass(frozen=True)
class PublicIdentity:
    """What others need to share with this user (recipient) and to trust their bundles (signing key)."""

    signing_key_pem: str  # canonical SPKI PEM
    recipient: str | None = None  # age1...; None for a bare PEM signer key

    @property
    def key_id(self) -> str:
        return key_id_of(self.signing_key_pem)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return _load_public_key(self.signing_key_pem)

    def to_text(self) -> str:
        """The identity file: a header, the age recipient and the PEM signing key."""
        lines = [_HEADER]
        if self.recipient:
            lines.append(self.recipient)
        return "\n".join(lines) + "\n" + self.signing_key_pem

    @classmethod
    def parse(cls, text: str | bytes) -> "PublicIdentity":
        """Read an identity file written by ``vault identity export``, or a bare PEM public key.

        Raises:
            UsageError: too large, no P-256 PEM public key, or more than one of anything.
        """
        if isinstance(text, bytes):
            if len(text) > MAX_IDENTITY_BYTES:
                raise UsageError(f"an identity file is at most {MAX_IDENTITY_BYTES} bytes")
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise UsageError("an identity file must be ASCII text") from None
        if len(text) > MAX_IDENTITY_BYTES:
            raise UsageError(f"an identity file is at most {MAX_IDENTITY_BYTES} bytes")
        pems = _PEM.findall(text)
        if len(pems) != 1:
            raise UsageError("expected exactly one PEM public key (-----BEGIN PUBLIC KEY-----)")
        rest = _PEM.sub("", text)
        recipients = []
        for line in rest.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not _RECIPIENT.match(line):
                raise UsageError("unexpected line in identity file (expected an age1... recipient)")
            recipients.append(line)
        if len(recipients) > 1:
            raise UsageError("an identity file holds at most one age recipient")
        key = _load_public_key(pems[0])
        return cls(signing_key_pem=_canonical_pem(key), recipient=recipients[0] if recipients else None)


class Identity:
    """The private half, loaded from the keyring. Keep it short-lived; never serialise it to disk."""

    def __init__(self, signing_key: ec.EllipticCurvePrivateKey, age_identity: str) -> None:
        from vault import age

        self._signing_key = signing_key
        self._age_identity = age.X25519Identity.from_string(age_identity)
        self.public = PublicIdentity(
            signing_key_pem=_canonical_pem(signing_key.public_key()),
            recipient=self._age_identity.recipient.to_string(),
        )

    @property
    def age_identity(self):  # vault.age.X25519Identity
        return self._age_identity

    @property
    def signing_key(self) -> ec.EllipticCurvePrivateKey:
        return self._signing_key

    @contextlib.contextmanager
    def signing_key_file(self) -> Iterator[tuple[str, bytes]]:
        """A ``/proc/self/fd/N`` path holding the signing key, for libraries that insist on a path.

        The key is written to an anonymous memfd (never a file system), PEM-encrypted under a
        fresh random password so that another process peeking at ``/proc/<pid>/fd/N`` during the
        call gets nothing usable. Yields ``(path, password)``; the memfd is closed on exit.
        """
        password = secrets.token_hex(32).encode("ascii")  # model-signing wants bytes, not str
        pem = self._signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        fd = os.memfd_create("vault-signing-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            yield f"/proc/self/fd/{fd}", password
        finally:
            os.close(fd)


def load_identity(keys, *, create: bool = False) -> Identity:
    """Load this user's sharing identity from the keyring, creating it on first use if asked.

    Args:
        keys: a :class:`vault.keys.KeyStore` (``get``/``set``).
        create: generate missing keys (``vault identity`` does; verify/import do not need to).

    Raises:
        UsageError: no identity yet and ``create`` is False.
        IntegrityError: a key in the keyring is damaged.
        KeyringMissingError, KeyringLockedError: from the keyring.
    """
    from vault import age

    pem = keys.get(SIGNING_KEY)
    ident = keys.get(SHARE_IDENTITY)
    if (pem is None or ident is None) and not create:
        raise UsageError("no sharing identity yet; run 'vault identity' to create one")
    if pem is None:
        new_key = ec.generate_private_key(ec.SECP256R1())
        pem = new_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        keys.set(SIGNING_KEY, pem)
    if ident is None:
        ident = age.X25519Identity.generate().to_string()
        keys.set(SHARE_IDENTITY, ident)
    try:
        signing_key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise IntegrityError("the signing key in the OS keyring is damaged") from None
    if not isinstance(signing_key, ec.EllipticCurvePrivateKey) or not isinstance(signing_key.curve, ec.SECP256R1):
        raise IntegrityError("the signing key in the OS keyring is not ECDSA P-256")
    try:
        return Identity(signing_key, ident)
    except ValueError:
        raise IntegrityError("the sharing identity in the OS keyring is damaged") from None
