"""Trusted signers: whose bundles this user accepts.

The list is not secret but its integrity is everything: whoever can add a signer can make
``vault import`` accept their bundles. It lives in ``VAULT_HOME/trust.json`` (0600, atomic
writes) and its SHA-256 is anchored in the OS keyring (``trust-digest``). A process with file
access but without the unlocked keyring can therefore neither add a signer nor roll the file
back to an older version (say, one that still lists a signer the user removed): either shows
up as an :class:`IntegrityError` on the next read.

A write is journalled so a crash cannot lock the user out: the new list is first written to
``trust.json.pending``, then the keyring anchor is moved to its digest, then it is renamed into
place. A reader that finds the anchor pointing at the pending file finishes the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from vault.errors import AlreadyExistsError, IntegrityError, UnknownNameError, UsageError
from vault.fsio import atomic_write, fsync_dir, vault_lock
from vault.identity import PublicIdentity
from vault.licence import format_time

__all__ = ["TrustedSigner", "TrustStore", "TRUST_DIGEST", "MAX_SIGNERS"]

TRUST_DIGEST = "trust-digest"
FORMAT = "vault-trust/1"
MAX_SIGNERS = 1000
_MAX_FILE = 4 * 1024 * 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")


@dataclass(frozen=True)
class TrustedSigner:
    name: str
    identity: PublicIdentity
    added: str  # ISO-8601 UTC

    @property
    def key_id(self) -> str:
        return self.identity.key_id

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "recipient": self.identity.recipient,
            "public_key": self.identity.signing_key_pem,
            "added": self.added,
        }


def check_name(name: str) -> str:
    """Signer names: lowercase letters, digits, '.', '_', '@', '-'; at most 64 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError("a signer name is 1-64 lowercase letters, digits, '.', '_', '@' or '-'")
    return name


class TrustStore:
    """The trusted-signer list of one vault.

    Args:
        home: the vault directory (``Vault.home``).
        keys: the vault's :class:`vault.keys.KeyStore` (holds the integrity anchor).
    """

    def __init__(self, home: Path, keys) -> None:
        self.home = Path(home)
        self.keys = keys
        self.path = self.home / "trust.json"
        self.pending = self.home / "trust.json.pending"

    # -- reading ----------------------------------------------------------------
    def list(self) -> list[TrustedSigner]:
        """All trusted signers, sorted by name.

        Raises:
            IntegrityError: the file was changed, replaced, rolled back or planted outside vault.
        """
        return sorted(self._load().values(), key=lambda s: s.name)

    def get(self, name: str) -> TrustedSigner:
        signers = self._load()
        if name not in signers:
            raise UnknownNameError(f"no trusted signer named '{name}' (see 'vault trust list')")
        return signers[name]

    def by_key_id(self, key_id: str) -> TrustedSigner | None:
        for signer in self._load().values():
            if signer.key_id == key_id:
                return signer
        return None

    # -- changing -----------------------------------------------------------------
    def add(self, name: str, identity: PublicIdentity, *, force: bool = False, now: datetime | None = None) -> TrustedSigner:
        """Trust ``identity``'s signing key under ``name``.

        Raises:
            AlreadyExistsError: the name (or the same key under another name) is already trusted.
        """
        check_name(name)
        with vault_lock(self.home):
            signers = self._load()
            if name in signers and not force:
                raise AlreadyExistsError(f"a signer named '{name}' is already trusted; use --force to replace it")
            for other in signers.values():
                if other.key_id == identity.key_id and other.name != name:
                    raise AlreadyExistsError(f"that key is already trusted as '{other.name}'")
            if len(signers) >= MAX_SIGNERS and name not in signers:
                raise UsageError(f"at most {MAX_SIGNERS} trusted signers")
            signer = TrustedSigner(name, identity, format_time(now or datetime.now(timezone.utc)))
            signers[name] = signer
            self._save(signers)
        return signer

    def remove(self, name: str) -> None:
        """Stop trusting ``name``.

        Raises:
            UnknownNameError: no such signer.
        """
        with vault_lock(self.home):
            signers = self._load()
            if name not in signers:
                raise UnknownNameError(f"no trusted signer named '{name}' (see 'vault trust list')")
            del signers[name]
            self._save(signers)

    # -- storage --------------------------------------------------------------------
    def _read(self, path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:
            raise IntegrityError("the trusted-signer list cannot be read safely (is it a symlink?)") from None
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(_MAX_FILE + 1)
        if len(data) > _MAX_FILE:
            raise IntegrityError("the trusted-signer list is implausibly large")
        return data

    def _load(self) -> dict[str, TrustedSigner]:
        anchor = self.keys.get(TRUST_DIGEST)
        data = self._read(self.path)
        if anchor is None:
            if data is not None:
                raise IntegrityError(
                    "trust.json was not written by this vault (no anchor in the OS keyring); "
                    "refusing to use it - delete it and re-add your signers"
                )
            return {}
        if data is None or hashlib.sha256(data).hexdigest() != anchor:
            pending = self._read(self.pending)
            if pending is not None and hashlib.sha256(pending).hexdigest() == anchor:
                os.replace(self.pending, self.path)  # finish a write interrupted after the anchor moved
                fsync_dir(self.home)
                data = pending
            else:
                raise IntegrityError(
                    "the trusted-signer list was changed outside vault (its digest does not match the "
                    "OS keyring); refusing to use it"
                )
        return self._decode(data)

    def _decode(self, data: bytes) -> dict[str, TrustedSigner]:
        # the digest matched, so this is our own output; still parse defensively.
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise ValueError
            out = {}
            for item in doc["signers"]:
                ident = PublicIdentity.parse(item["public_key"])
                ident = PublicIdentity(ident.signing_key_pem, item.get("recipient"))
                out[check_name(item["name"])] = TrustedSigner(item["name"], ident, item["added"])
            return out
        except (ValueError, KeyError, TypeError, UsageError):
            raise IntegrityError("the trusted-signer list is damaged") from None

    def _save(self, signers: dict[str, TrustedSigner]) -> None:
        doc = {"format": FORMAT, "signers": [s.to_json() for s in sorted(signers.values(), key=lambda s: s.name)]}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.pending, data)
        self.keys.set(TRUST_DIGEST, hashlib.sha256(data).hexdigest())
        os.replace(self.pending, self.path)
        fsync_dir(self.home)
