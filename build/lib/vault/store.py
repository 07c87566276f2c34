"""The sealed store: adapters and records as age v1 files bound to a device key and a recovery key.

Layout of a vault directory (0700; every file 0600)::

    config.json          public only: vault id, device recipient, recovery recipient
    index.age            the SEALED index: names, metadata, licences, audit verdicts, object digests
    objects/<id>.age     one sealed file per adapter or record (random id: names never reach the disk)
    .lock                the advisory lock every mutation holds

Every sealed file is one age v1 file encrypted to two recipients, the device identity (in the OS
keyring) and the recovery identity (shown once at ``init``, stored nowhere): like sops, one data key
wrapped per master key. ``age -d -i recovery.key objects/<id>.age`` therefore returns the plain
safetensors blob with no vault code.

age gives confidentiality, not authenticity: anyone who knows the public recipients can make a valid
age file. So the index carries an HMAC-SHA-256 under a key derived from the device identity, and it
records the sha256 and size of each object's plaintext; :meth:`Vault.open` refuses an object whose
plaintext does not match. A forged or swapped index or object is an :class:`IntegrityError`.

Crash safety: every file is written by :func:`vault.fsio.atomic_write`; a new object is written
before the index that names it (an interrupted add leaves an orphan, never a dangling name; ``doctor``
removes orphans); rotate/recover keep the old and the new device key in the keyring until the new
index is committed, and the old key is replaced only after every file is re-wrapped, so a kill at
any point leaves the vault openable. An interrupted rotate/recover resumes on the next ``rotate``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault import age
from vault.adapter import AdapterMeta, load_blob, read_adapter
from vault.errors import (
    AlreadyExistsError,
    AlreadyInitializedError,
    IntegrityError,
    KeyringLockedError,
    KeyringMissingError,
    NoIdentityError,
    NotInitializedError,
    UnknownNameError,
    UsageError,
    VaultError,
)
from vault.fsio import TMP_SUFFIX, atomic_write, crash_point, fsync_dir, secure_remove, vault_lock
from vault.keys import DEVICE_IDENTITY, DEVICE_IDENTITY_NEXT, KeyStore
from vault.paths import vault_home

__all__ = ["Vault", "Entry", "Check", "Progress", "CONFIG_FILE", "INDEX_FILE", "OBJECTS_DIR"]

CONFIG_FILE = "config.json"
INDEX_FILE = "index.age"
OBJECTS_DIR = "objects"
CONFIG_FORMAT = "vault/1"
INDEX_FORMAT = "vault-index/1"
MAX_CONFIG_BYTES = 64 << 10
MAX_INDEX_BYTES = 64 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RECORD_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_OBJECT_RE = re.compile(r"^[0-9a-f]{32}\.age$")
_TMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}" + re.escape(TMP_SUFFIX) + "$")  # fsio.atomic_write's temporaries
_UPDATABLE = {"audit", "licence", "source"}
_MAC_INFO = b"vault index mac v1"

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is e.g. 'validate', 'seal', 'rewrap'."""


@dataclass(frozen=True)
class Entry:
    """One sealed adapter as the index describes it (the index is sealed; this is in memory only)."""

    name: str
    sha256: str  # of the plaintext safetensors blob
    size: int
    created: str
    base_name: str
    base_sha256: str
    r: int
    target_modules: list[str]
    source: str = "local"
    audit: Any = None
    licence: Any = None
    object: str = ""  # file name under objects/

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """One ``doctor`` finding. status: 'ok', 'warn', 'fail' or 'skip'."""

    name: str
    status: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _check_name(name: str, pattern: re.Pattern[str] = _NAME_RE) -> str:
    if not isinstance(name, str) or not pattern.match(name):
        raise UsageError(
            f"invalid name {name[:80]!r}: use letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return name


def _mac_key(identity: age.X25519Identity) -> bytes:
    """The index MAC key: bound to the device identity, so forging an index needs the keyring."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO).derive(
        identity.to_string().encode("ascii")
    )


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _read_config(home: Path) -> dict[str, Any]:
    path = home / CONFIG_FILE
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise NotInitializedError(f"no vault at {home}; run 'vault init' first") from None
    except OSError as exc:
        raise VaultError(f"failed to read {path}: {exc.strerror or exc}") from exc
    try:
        config = json.loads(raw)
        if len(raw) > MAX_CONFIG_BYTES or config.get("format") != CONFIG_FORMAT:
            raise ValueError("unknown format")
        KeyStore(config["vault_id"])
        age.X25519Recipient.from_string(config["device_recipient"])
        age.X25519Recipient.from_string(config["recovery_recipient"])
    except (ValueError, KeyError, TypeError, AttributeError, VaultError):
        raise IntegrityError(f"{path} is damaged or not a vault config") from None
    return config


class Vault:
    """An opened vault. Construct with ``Vault(home)``; make one with :meth:`Vault.create`.

    Args:
        home: the vault directory (default: ``$VAULT_HOME`` or the platform user data dir).
        keys: the keyring access to use (tests inject one); it is re-namespaced to this vault's id.
        lock_timeout: seconds to wait for another vault process before :class:`LockedError`.

    Raises:
        NotInitializedError: there is no vault at ``home``.
    """

    def __init__(self, home: Path | str | None = None, *, keys: KeyStore | None = None, lock_timeout: float = 30.0):
        self.home = Path(home) if home is not None else vault_home()
        self.config = _read_config(self.home)
        self.vault_id: str = self.config["vault_id"]
        if keys is None:
            keys = KeyStore(self.vault_id)
        elif keys.vault_id != self.vault_id:
            keys = keys.with_vault_id(self.vault_id)
        self.keys = keys
        self.lock_timeout = lock_timeout
        self._lock_depth = 0
        self._identity_cache: list[age.X25519Identity] | None = None
        self._index_cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ creation and recovery

    @classmethod
    def create(cls, home: Path | str | None = None, *, keys: KeyStore | None = None) -> tuple["Vault", str]:
        """Make a new vault: a device identity in the keyring and a recovery identity for the user.

        Returns:
            (the vault, the recovery secret key ``AGE-SECRET-KEY-1...``). The recovery key is stored
            nowhere: the caller must show it to the user once (or seal it with a passphrase).

        Raises:
            AlreadyInitializedError: ``home`` already holds a vault.
            KeyringMissingError, KeyringLockedError: the device key cannot be stored.
        """
        home = Path(home) if home is not None else vault_home()
        if (home / CONFIG_FILE).exists():
            raise AlreadyInitializedError(f"a vault already exists at {home}")
        vault_id = secrets.token_hex(10)
        keys = keys.with_vault_id(vault_id) if keys is not None else KeyStore(vault_id)
        device, recovery = age.X25519Identity.generate(), age.X25519Identity.generate()
        keys.set(DEVICE_IDENTITY, device.to_string())  # first: a missing/locked keyring fails before any file
        for directory in (home, home / OBJECTS_DIR):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        body = {
            "format": INDEX_FORMAT,
            "vault_id": vault_id,
            "device_recipient": device.recipient.to_string(),
            "recovery_recipient": recovery.recipient.to_string(),
            "updated": _now(),
            "entries": {},
            "records": {},
        }
        _write_index(home, body, device)
        _write_config(home, body, created=_now())  # the commit point of init
        vault = cls(home, keys=keys)
        vault._identity_cache = [device]
        return vault, recovery.to_string()

    @classmethod
    def recover(
        cls,
        recovery_key: str,
        home: Path | str | None = None,
        *,
        keys: KeyStore | None = None,
        progress: Progress | None = None,
    ) -> "Vault":
        """Take over a vault directory on a new machine with the recovery key.

        Makes a new device identity, re-wraps every sealed file to it (and the recovery recipient), and
        stores it in this machine's keyring. The index cannot be authenticated against the lost device
        key, so recover trusts the directory it is given: restore it from your own backup.

        Raises:
            UsageError: ``recovery_key`` is not an age X25519 secret key.
            NoIdentityError: the key is not this vault's recovery key.
            NotInitializedError: there is no vault directory at ``home``.
        """
        try:
            recovery = age.X25519Identity.from_string(recovery_key.strip())
        except (ValueError, VaultError):
            raise UsageError("that is not an age recovery key (expected AGE-SECRET-KEY-1...)") from None
        vault = cls(home, keys=keys)
        if recovery.recipient.to_string() != vault.config["recovery_recipient"]:
            raise NoIdentityError(f"this recovery key does not belong to the vault at {vault.home}")
        with vault._mutating():
            body = _open_index(vault.home, [recovery], authenticate=None)
            if body["recovery_recipient"] != recovery.recipient.to_string():
                raise IntegrityError("the index does not name this recovery key")
            vault._switch_device(body, [recovery], progress, stage="recover")
        return vault

    # ------------------------------------------------------------------ reading

    def entries(self) -> list[Entry]:
        """All adapters, sorted by name."""
        return [_entry(name, e) for name, e in sorted(self._index()["entries"].items())]

    def get(self, name: str) -> Entry:
        """The entry for ``name``.

        Raises:
            UnknownNameError: no adapter of that name.
        """
        entry = self._index()["entries"].get(name)
        if entry is None:
            raise UnknownNameError(f"no adapter named {name[:80]!r} in the vault")
        return _entry(name, entry)

    def object_path(self, name: str) -> Path:
        """The sealed file of adapter ``name`` (for ``age -d -i recovery.key <path>``)."""
        return self.home / OBJECTS_DIR / self.get(name).object

    def open(self, name: str) -> bytearray:
        """Decrypt adapter ``name`` into memory: the plaintext safetensors blob.

        The caller owns the buffer and should zero it (``buf[:] = bytes(len(buf))``) when done.

        Raises:
            UnknownNameError, NoIdentityError (sealed to another device), IntegrityError (tampered,
            truncated, or not the object the index names).
        """
        entry = self.get(name)
        return self._open_object(entry.object, entry.sha256, entry.size, what=f"adapter {name!r}")

    def open_meta(self, name: str) -> AdapterMeta:
        """The adapter's own metadata (decrypts it; the plaintext is zeroed before returning)."""
        blob = self.open(name)
        try:
            return load_blob(blob)[1]
        finally:
            blob[:] = bytes(len(blob))

    # ------------------------------------------------------------------ adding and changing

    def add(
        self,
        name: str,
        path: Path | str,
        *,
        base_name: str | None = None,
        base_sha256: str | None = None,
        force: bool = False,
        remove_source: bool = False,
        progress: Progress | None = None,
    ) -> Entry:
        """Validate the adapter at ``path`` (PEFT dir or GGUF LoRA) and seal it as ``name``.

        Args:
            base_name: overrides the base the adapter declares (needed if it declares none).
            base_sha256: sha256 of the base GGUF the adapter is for ("" if unknown).
            force: replace an existing adapter of that name.
            remove_source: after sealing, overwrite and unlink the plaintext files (best effort:
                see :func:`vault.fsio.secure_remove` about CoW filesystems and SSDs).

        Raises:
            AlreadyExistsError, InvalidAdapterError, DiskFullError, LockedError, keyring errors.
        """
        _check_name(name)
        if not force and name in self._index()["entries"]:
            raise AlreadyExistsError(f"{name!r} already exists in the vault; use --force to replace it")
        _report(progress, "validate", 0, 1)
        adapter = read_adapter(path, base_name=base_name, base_sha256=base_sha256)
        _report(progress, "validate", 1, 1)
        entry = self._put(
            name, adapter.blob, adapter.meta, source="local", licence=None, force=force, progress=progress
        )
        if remove_source:
            _remove_source(Path(path))
        return entry

    def add_blob(
        self, name: str, blob: bytes | bytearray | memoryview, *, source: str = "local", licence: Any = None,
        force: bool = False,
    ) -> Entry:
        """Seal an adapter blob made by :func:`vault.adapter.make_blob` (training, import).

        Raises:
            AlreadyExistsError, InvalidAdapterError (the blob is validated first), DiskFullError.
        """
        _check_name(name)
        _, meta = load_blob(blob)
        return self._put(name, blob, meta, source=source, licence=licence, force=force, progress=None)

    def update_entry(self, name: str, **fields: Any) -> Entry:
        """Change ``audit``, ``licence`` or ``source`` of an adapter (JSON-serializable values)."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)}; only {sorted(_UPDATABLE)}")
        json.dumps(fields)  # fail before touching anything if a value is not JSON
        with self._mutating():
            body = self._index()
            if name not in body["entries"]:
                raise UnknownNameError(f"no adapter named {name[:80]!r} in the vault")
            new = copy.deepcopy(body)
            new["entries"][name].update(fields)
            self._commit(new)
        return self.get(name)

    def remove(self, name: str) -> None:
        """Remove adapter ``name``: first from the sealed index, then its sealed file.

        Raises:
            UnknownNameError.
        """
        with self._mutating():
            body = self._index()
            if name not in body["entries"]:
                raise UnknownNameError(f"no adapter named {name[:80]!r} in the vault")
            new = copy.deepcopy(body)
            old = new["entries"].pop(name)
            self._commit(new)
            self._drop_object(old["object"])

    # ------------------------------------------------------------------ records

    def seal_record(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data`` as record ``kind``/``name`` (replacing one of the same name)."""
        _check_name(kind, _KIND_RE)
        _check_name(name, _RECORD_NAME_RE)
        with self._mutating():
            body = self._index()
            object_name = self._write_object(data)
            new = copy.deepcopy(body)
            kind_records = new["records"].setdefault(kind, {})
            old = kind_records.get(name)
            kind_records[name] = {
                "object": object_name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(memoryview(data).cast("B")),
                "created": _now(),
            }
            self._commit(new)
            if old:
                self._drop_object(old["object"])

    def open_record(self, kind: str, name: str) -> bytearray:
        """Decrypt record ``kind``/``name`` into memory.

        Raises:
            UnknownNameError, NoIdentityError, IntegrityError.
        """
        record = self._index()["records"].get(kind, {}).get(name)
        if record is None:
            raise UnknownNameError(f"no {kind[:32]} record named {name[:80]!r} in the vault")
        return self._open_object(record["object"], record["sha256"], record["size"], what=f"{kind} {name!r}")

    def records(self, kind: str) -> list[str]:
        """Names of the records of ``kind``, sorted."""
        return sorted(self._index()["records"].get(kind, {}))

    def remove_record(self, kind: str, name: str) -> None:
        with self._mutating():
            body = self._index()
            if name not in body["records"].get(kind, {}):
                raise UnknownNameError(f"no {kind[:32]} record named {name[:80]!r} in the vault")
            new = copy.deepcopy(body)
            old = new["records"][kind].pop(name)
            if not new["records"][kind]:
                del new["records"][kind]
            self._commit(new)
            self._drop_object(old["object"])

    # ------------------------------------------------------------------ keys

    def rotate(self, *, progress: Progress | None = None) -> None:
        """Make a new device identity and re-wrap every sealed file to it (and to the recovery key).

        The new key is stored in the keyring (as the *next* key) before any file changes; the old key is
        replaced only after every file is re-wrapped and the new index is committed. A rotate that was
        interrupted is resumed (to the same new key) rather than started over.
        """
        with self._mutating():
            body = self._index()
            self._switch_device(body, self._identities(), progress, stage="rewrap")

    def _switch_device(
        self, body: dict[str, Any], identities: list[age.X25519Identity], progress: Progress | None, *, stage: str
    ) -> None:
        pending = self.keys.get(DEVICE_IDENTITY_NEXT)
        if pending:
            new = age.X25519Identity.from_string(pending)  # resume the interrupted rotate/recover
        else:
            new = age.X25519Identity.generate()
            self.keys.set(DEVICE_IDENTITY_NEXT, new.to_string())
        crash_point("rotate:next-key-stored")
        recipients = [new.recipient, age.X25519Recipient.from_string(body["recovery_recipient"])]
        unwrap_with = [*identities, new]
        objects = sorted(_referenced_objects(body))
        for done, object_name in enumerate(objects, 1):
            path = self.home / OBJECTS_DIR / object_name
            atomic_write(path, age.rewrap(path, unwrap_with, recipients))
            crash_point("rotate:rewrapped")
            _report(progress, stage, done, len(objects))
        new_body = copy.deepcopy(body)
        new_body["device_recipient"] = new.recipient.to_string()
        self._identity_cache = [*identities, new]
        self._commit(new_body, mac_identity=new)  # the commit point: from here the new key is authoritative
        crash_point("rotate:index-written")
        _write_config(self.home, new_body, created=self.config.get("created", _now()))
        self.config = _read_config(self.home)
        crash_point("rotate:config-written")
        self.keys.set(DEVICE_IDENTITY, new.to_string())
        crash_point("rotate:device-key-replaced")
        self.keys.delete(DEVICE_IDENTITY_NEXT)
        self._identity_cache = [new]

    # ------------------------------------------------------------------ health

    def doctor(self, *, fix: bool = False) -> list[Check]:
        """Check the keyring, file modes and the integrity of every sealed file.

        Args:
            fix: also repair what is safe to repair: tighten file modes, delete orphaned objects and
                leftover temporary files (from an interrupted write), rewrite a stale config.

        Returns:
            one :class:`Check` per aspect; any 'fail' means the vault needs attention.
        """
        checks: list[Check] = []
        try:
            backend = self.keys.check()
            checks.append(Check("keyring", "ok", f"{backend} reachable and unlocked"))
        except KeyringMissingError as exc:
            return [Check("keyring", "fail", exc.message)]
        except KeyringLockedError as exc:
            return [Check("keyring", "fail", exc.message)]
        with self._mutating():
            checks.append(self._check_modes(fix))
            try:
                self._identity_cache = None
                identities = self._identities()
                body = self._index()
            except VaultError as exc:
                checks.append(Check("index", "fail", exc.message))
                return checks
            checks.append(Check("index", "ok", f"sealed index authenticated ({len(body['entries'])} adapters)"))
            checks.append(self._check_device_key(body, identities))
            checks.append(self._check_config(body, fix))
            checks.append(self._check_objects(body))
            checks.append(self._check_orphans(body, fix))
        return checks

    def _check_device_key(self, body: dict[str, Any], identities: list[age.X25519Identity]) -> Check:
        if self.keys.get(DEVICE_IDENTITY_NEXT):
            detail = "a key rotation or recovery was interrupted; run 'vault rotate' to finish it"
            return Check("device-key", "warn", detail)
        current = [i for i in identities if i.recipient.to_string() == body["device_recipient"]]
        if not current:
            return Check("device-key", "fail", "the keyring's device key is not the one the index names")
        return Check("device-key", "ok", f"device key {body['device_recipient'][:16]}... in the keyring")

    def _check_config(self, body: dict[str, Any], fix: bool) -> Check:
        stale = any(self.config.get(k) != body[k] for k in ("vault_id", "device_recipient", "recovery_recipient"))
        if not stale:
            return Check("config", "ok", "config.json agrees with the sealed index")
        if fix:
            _write_config(self.home, body, created=self.config.get("created", _now()))
            self.config = _read_config(self.home)
            return Check("config", "ok", "config.json was stale (interrupted rotate); rewritten from the index")
        return Check("config", "warn", "config.json disagrees with the sealed index; run 'vault doctor --fix'")

    def _check_modes(self, fix: bool) -> Check:
        wrong: list[str] = []
        objects = self.home / OBJECTS_DIR
        ours = [self.home, objects, *(self.home / n for n in (CONFIG_FILE, INDEX_FILE, ".lock")), *objects.iterdir()]
        for path in ours:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
            if stat.S_IMODE(st.st_mode) & ~want:
                wrong.append(f"{path.relative_to(self.home.parent)} {stat.S_IMODE(st.st_mode):o}")
                if fix:
                    os.chmod(path, want, follow_symlinks=False)
        if not wrong:
            return Check("permissions", "ok", "directories 0700, files 0600")
        verb = "fixed" if fix else "too open"
        return Check("permissions", "ok" if fix else "fail", f"{verb}: {', '.join(wrong[:5])}")

    def _check_objects(self, body: dict[str, Any]) -> Check:
        bad: list[str] = []
        items = [(f"adapter {n!r}", e) for n, e in body["entries"].items()]
        items += [(f"{k} {n!r}", r) for k, recs in body["records"].items() for n, r in recs.items()]
        for what, item in items:
            try:
                buf = self._open_object(item["object"], item["sha256"], item["size"], what=what)
                buf[:] = bytes(len(buf))
            except VaultError as exc:
                bad.append(f"{what}: {exc.message}")
        if bad:
            return Check("objects", "fail", "; ".join(bad[:5]))
        return Check("objects", "ok", f"{len(items)} sealed files decrypt and match the index")

    def _check_orphans(self, body: dict[str, Any], fix: bool) -> Check:
        referenced = _referenced_objects(body)
        stray = [
            p for d in (self.home, self.home / OBJECTS_DIR) for p in d.iterdir()
            if _TMP_RE.match(p.name) or (d.name == OBJECTS_DIR and p.name not in referenced)
        ]
        if not stray:
            return Check("orphans", "ok", "no orphaned or temporary files")
        if fix:
            for path in stray:
                path.unlink()
            fsync_dir(self.home / OBJECTS_DIR)
            fsync_dir(self.home)
            return Check("orphans", "ok", f"removed {len(stray)} orphaned or temporary files")
        return Check("orphans", "warn", f"{len(stray)} orphaned or temporary files; run 'vault doctor --fix'")

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _mutating(self) -> Iterator[None]:
        """Hold the vault lock (re-entrant within this object) and re-read the index under it."""
        if self._lock_depth:
            yield
            return
        with vault_lock(self.home, timeout=self.lock_timeout):
            self._lock_depth += 1
            self._index_cache = None
            try:
                yield
            finally:
                self._lock_depth -= 1

    def _identities(self) -> list[age.X25519Identity]:
        if self._identity_cache is None:
            found = [self.keys.get(n) for n in (DEVICE_IDENTITY, DEVICE_IDENTITY_NEXT)]
            identities = [age.X25519Identity.from_string(s) for s in found if s]
            if not identities:
                raise NoIdentityError(
                    f"this machine's keyring has no device key for the vault at {self.home}; "
                    "run 'vault recover' with the recovery key"
                )
            self._identity_cache = identities
        return self._identity_cache

    def _fresh_keys(self, fn: Callable[[list[age.X25519Identity]], Any]) -> Any:
        """Run ``fn(identities)``; if nothing unwraps, re-read the keyring once (another process may have rotated)."""
        try:
            return fn(self._identities())
        except (NoIdentityError, IntegrityError):
            if self._identity_cache is None:
                raise
            self._identity_cache = None
            return fn(self._identities())

    def _index(self) -> dict[str, Any]:
        path = self.home / INDEX_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"the sealed index {path} is missing") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._index_cache is None or self._index_cache[0] != stamp:
            body = self._fresh_keys(lambda ids: _open_index(self.home, ids, authenticate=ids))
            if body["vault_id"] != self.vault_id:
                raise IntegrityError("the sealed index belongs to another vault")
            self._index_cache = (stamp, body)
        return self._index_cache[1]

    def _recipients(self, body: dict[str, Any]) -> list[age.X25519Recipient]:
        return [age.X25519Recipient.from_string(body[k]) for k in ("device_recipient", "recovery_recipient")]

    def _commit(self, body: dict[str, Any], *, mac_identity: age.X25519Identity | None = None) -> None:
        body["updated"] = _now()
        if mac_identity is None:
            mac_identity = _identity_for(self._identities(), body["device_recipient"])
        _write_index(self.home, body, mac_identity)
        self._index_cache = None

    def _write_object(self, data: bytes | bytearray | memoryview) -> str:
        object_name = f"{secrets.token_hex(16)}.age"
        recipients = self._recipients(self._index())
        atomic_write(self.home / OBJECTS_DIR / object_name, lambda fh: age.encrypt_to_file(fh, data, recipients))
        return object_name

    def _drop_object(self, object_name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.home / OBJECTS_DIR / object_name).unlink()
        fsync_dir(self.home / OBJECTS_DIR)

    def _put(
        self, name: str, blob: bytes | bytearray | memoryview, meta: AdapterMeta, *, source: str, licence: Any,
        force: bool, progress: Progress | None,
    ) -> Entry:
        with self._mutating():
            old = self._index()["entries"].get(name)
            if old is not None and not force:
                raise AlreadyExistsError(f"{name!r} already exists in the vault; use --force to replace it")
            _report(progress, "seal", 0, 1)
            object_name = self._write_object(blob)
            crash_point("add:object-written")
            new = copy.deepcopy(self._index())
            new["entries"][name] = {
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(memoryview(blob).cast("B")),
                "created": meta.created,
                "base_name": meta.base_name,
                "base_sha256": meta.base_sha256,
                "r": meta.r,
                "target_modules": list(meta.target_modules),
                "source": source,
                "audit": None,
                "licence": licence,
                "object": object_name,
            }
            self._commit(new)
            crash_point("add:index-written")
            if old is not None:
                self._drop_object(old["object"])
            _report(progress, "seal", 1, 1)
        return self.get(name)

    def _open_object(self, object_name: str, sha256: str, size: int, *, what: str) -> bytearray:
        path = self.home / OBJECTS_DIR / object_name
        if not path.is_file():
            raise IntegrityError(f"the sealed file of {what} is missing")
        plaintext = self._fresh_keys(lambda ids: age.decrypt_file(path, ids))
        if len(plaintext) != size or not hmac.compare_digest(hashlib.sha256(plaintext).hexdigest(), sha256):
            plaintext[:] = bytes(len(plaintext))
            raise IntegrityError(f"the sealed file of {what} is not the one the index names")
        return plaintext


def _entry(name: str, raw: dict[str, Any]) -> Entry:
    return Entry(name=name, **raw)


def _referenced_objects(body: dict[str, Any]) -> set[str]:
    names = {e["object"] for e in body["entries"].values()}
    names |= {r["object"] for recs in body["records"].values() for r in recs.values()}
    return names


def _identity_for(identities: list[age.X25519Identity], recipient: str) -> age.X25519Identity:
    for identity in identities:
        if identity.recipient.to_string() == recipient:
            return identity
    raise IntegrityError("the sealed index names a device key this keyring does not hold")


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _write_config(home: Path, body: dict[str, Any], *, created: str) -> None:
    config = {
        "format": CONFIG_FORMAT,
        "vault_id": body["vault_id"],
        "device_recipient": body["device_recipient"],
        "recovery_recipient": body["recovery_recipient"],
        "created": created,
    }
    atomic_write(home / CONFIG_FILE, json.dumps(config, indent=2).encode() + b"\n")


def _write_index(home: Path, body: dict[str, Any], mac_identity: age.X25519Identity) -> None:
    if mac_identity.recipient.to_string() != body["device_recipient"]:
        raise ValueError("the index must be authenticated with the device key it names")
    payload = _canonical(body)
    mac = hmac.new(_mac_key(mac_identity), payload, hashlib.sha256).hexdigest()
    sealed = json.dumps({"index": body, "mac": mac}, sort_keys=True).encode()
    recipients = [age.X25519Recipient.from_string(body[k]) for k in ("device_recipient", "recovery_recipient")]
    atomic_write(home / INDEX_FILE, lambda fh: age.encrypt_to_file(fh, sealed, recipients))


def _open_index(
    home: Path, identities: list[age.X25519Identity], *, authenticate: list[age.X25519Identity] | None
) -> dict[str, Any]:
    """Decrypt the index; with ``authenticate``, also verify its MAC under the device key it names."""
    path = home / INDEX_FILE
    if not path.is_file():
        raise IntegrityError(f"the sealed index {path} is missing")
    if age.payload_size(path) > MAX_INDEX_BYTES:
        raise IntegrityError("the sealed index is implausibly large")
    plaintext = age.decrypt_file(path, identities)
    try:
        sealed = json.loads(bytes(plaintext))
        body, mac = sealed["index"], sealed["mac"]
        if body.get("format") != INDEX_FORMAT or not isinstance(mac, str):
            raise ValueError("unknown index format")
        for key in ("vault_id", "device_recipient", "recovery_recipient"):
            if not isinstance(body[key], str):
                raise ValueError(key)
        if not isinstance(body["entries"], dict) or not isinstance(body["records"], dict):
            raise ValueError("entries")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IntegrityError("the sealed index is damaged") from None
    finally:
        plaintext[:] = bytes(len(plaintext))
    if authenticate is not None:
        identity = _identity_for(authenticate, body["device_recipient"])
        expected = hmac.new(_mac_key(identity), _canonical(body), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            raise IntegrityError("the sealed index failed authentication (forged or swapped)")
    items = [*body["entries"].values(), *(r for recs in body["records"].values() for r in recs.values())]
    if not all(isinstance(i, dict) and _OBJECT_RE.match(str(i.get("object", ""))) for i in items):
        raise IntegrityError("the sealed index is damaged")
    return body


def _remove_source(path: Path) -> None:
    """Overwrite and unlink the plaintext files that were sealed (best effort; see secure_remove)."""
    if path.is_dir():
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            if (path / name).is_file():
                secure_remove(path / name)
        with contextlib.suppress(OSError):
            path.rmdir()  # only if nothing else was in it
    else:
        secure_remove(path)
