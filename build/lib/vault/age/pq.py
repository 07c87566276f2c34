"""age's post-quantum hybrid recipient: MLKEM768-X25519 (X-Wing) through HPKE.

    identity  = 32 random bytes, Bech32 "AGE-SECRET-KEY-PQ-"
    recipient = ML-KEM-768 encapsulation key (1184) || X25519 public key (32), Bech32 "age1pq"
    stanza    = "-> mlkem768x25519 <base64 enc (1120 bytes)>", body = HPKE ciphertext (32 bytes)

HPKE (RFC 9180) base mode, KEM MLKEM768-X25519 (0x647a, draft-ietf-hpke-pq), KDF
HKDF-SHA256, AEAD ChaCha20Poly1305, info "age-encryption.org/mlkem768x25519", empty aad.
The KEM combines both shared secrets as X-Wing does:
``SHA3-256(ss_mlkem || ss_x25519 || ct_x25519 || pk_x25519 || "\\.//^\\")``, and refuses an
all-zero X25519 output (identity or low-order point in *enc*).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from vault.errors import IntegrityError

from . import bech32
from .format import Stanza, b64decode, b64encode

__all__ = ["HybridRecipient", "HybridIdentity"]

_STANZA_TYPE = "mlkem768x25519"
_INFO = b"age-encryption.org/mlkem768x25519"
_SUITE_ID = b"HPKE" + (0x647A).to_bytes(2, "big") + (0x0001).to_bytes(2, "big") + (0x0003).to_bytes(2, "big")
_XWING_LABEL = b"\\.//^\\"
_MLKEM_PK, _MLKEM_CT, _X_LEN = 1184, 1088, 32
_ENC_LEN = _MLKEM_CT + _X_LEN
_BODY_LEN = 16 + 16


def _sha3_256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA3_256())
    h.update(data)
    return h.finalize()


def _expand_seed(seed: bytes) -> tuple[MLKEM768PrivateKey, X25519PrivateKey]:
    h = hashes.Hash(hashes.SHAKE256(digest_size=96))
    h.update(seed)
    expanded = h.finalize()
    return MLKEM768PrivateKey.from_seed_bytes(expanded[:64]), X25519PrivateKey.from_private_bytes(expanded[64:])


def _combine(ss_m: bytes, ss_x: bytes, ct_x: bytes, pk_x: bytes) -> bytes:
    return _sha3_256(ss_m + ss_x + ct_x + pk_x + _XWING_LABEL)


def _labeled_extract(salt: bytes, label: bytes, ikm: bytes) -> bytes:
    mac = hmac.HMAC(salt, hashes.SHA256())
    mac.update(b"HPKE-v1" + _SUITE_ID + label + ikm)
    return mac.finalize()


def _labeled_expand(prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    labeled_info = length.to_bytes(2, "big") + b"HPKE-v1" + _SUITE_ID + label + info
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=labeled_info).derive(prk)


def _key_schedule(shared_secret: bytes) -> tuple[bytes, bytes]:
    """RFC 9180 KeySchedule for mode_base with our fixed info; returns (key, base_nonce)."""
    context = (
        b"\x00"
        + _labeled_extract(b"", b"psk_id_hash", b"")
        + _labeled_extract(b"", b"info_hash", _INFO)
    )
    secret = _labeled_extract(shared_secret, b"secret", b"")
    return _labeled_expand(secret, b"key", context, 32), _labeled_expand(secret, b"base_nonce", context, 12)


class HybridRecipient:
    """An ``age1pq1...`` post-quantum hybrid public key (cannot be mixed with classic recipients)."""

    labels = frozenset({"postquantum"})

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != _MLKEM_PK + _X_LEN:
            raise ValueError("an MLKEM768-X25519 public key is 1216 bytes")
        self._mlkem = MLKEM768PublicKey.from_public_bytes(bytes(public_key[:_MLKEM_PK]))
        self._x = X25519PublicKey.from_public_bytes(bytes(public_key[_MLKEM_PK:]))
        self._public = bytes(public_key)

    @classmethod
    def from_string(cls, s: str) -> HybridRecipient:
        """Parse ``age1pq1...``. Raises ValueError if malformed."""
        if s.lower() != s:
            raise ValueError("malformed age recipient: must be lowercase")
        hrp, data = bech32.decode(s)
        if hrp != "age1pq":
            raise ValueError("malformed age post-quantum recipient")
        return cls(data)

    def to_string(self) -> str:
        return bech32.encode("age1pq", self._public)

    def wrap(self, file_key: bytes) -> list[Stanza]:
        ss_m, ct_m = self._mlkem.encapsulate()
        ephemeral = X25519PrivateKey.generate()
        ct_x = ephemeral.public_key().public_bytes_raw()
        try:
            ss_x = ephemeral.exchange(self._x)
        except ValueError:
            raise ValueError("invalid post-quantum recipient (low-order X25519 point)") from None
        key, nonce = _key_schedule(_combine(ss_m, ss_x, ct_x, self._public[_MLKEM_PK:]))
        body = ChaCha20Poly1305(key).encrypt(nonce, file_key, b"")
        return [Stanza(_STANZA_TYPE, (b64encode(ct_m + ct_x),), body)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HybridRecipient) and other._public == self._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"HybridRecipient({self.to_string()[:24]}...)"


class HybridIdentity:
    """An ``AGE-SECRET-KEY-PQ-1...`` secret key (a 32-byte seed). Its repr hides the secret."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an MLKEM768-X25519 identity is a 32-byte seed")
        self._seed = bytes(seed)
        self._mlkem, self._x = _expand_seed(self._seed)
        self._pk_x = self._x.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> HybridIdentity:
        return cls(os.urandom(32))

    @classmethod
    def from_string(cls, s: str) -> HybridIdentity:
        """Parse ``AGE-SECRET-KEY-PQ-1...``. Raises ValueError if malformed."""
        if s.upper() != s:
            raise ValueError("malformed age identity: must be uppercase")
        hrp, data = bech32.decode(s)
        if hrp != "age-secret-key-pq-" or len(data) != 32:
            raise ValueError("malformed age post-quantum identity")
        return cls(data)

    def to_string(self) -> str:
        return bech32.encode("age-secret-key-pq-", self._seed).upper()

    @property
    def recipient(self) -> HybridRecipient:
        return HybridRecipient(self._mlkem.public_key().public_bytes_raw() + self._pk_x)

    def unwrap(self, stanzas: Sequence[Stanza]) -> bytes | None:
        for stanza in stanzas:
            if stanza.type != _STANZA_TYPE:
                continue
            if len(stanza.args) != 1:
                raise IntegrityError()
            try:
                enc = b64decode(stanza.args[0])
            except ValueError:
                raise IntegrityError() from None
            if len(enc) != _ENC_LEN or len(stanza.body) != _BODY_LEN:
                raise IntegrityError()
            ct_m, ct_x = enc[:_MLKEM_CT], enc[_MLKEM_CT:]
            ss_m = self._mlkem.decapsulate(ct_m)  # implicit rejection: a bad ct gives a wrong key
            try:
                ss_x = self._x.exchange(X25519PublicKey.from_public_bytes(ct_x))
            except ValueError:  # all-zero shared secret
                raise IntegrityError() from None
            key, nonce = _key_schedule(_combine(ss_m, ss_x, ct_x, self._pk_x))
            try:
                return ChaCha20Poly1305(key).decrypt(nonce, stanza.body, b"")
            except InvalidTag:
                continue
        return None

    def __repr__(self) -> str:
        return f"HybridIdentity(recipient={self.recipient.to_string()[:24]}...)"
