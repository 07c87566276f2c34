"""Signed, encrypted, licensed bundles: export, verify and import.

A bundle is a directory of exactly four files::

    adapter.age    the adapter's safetensors blob, age-encrypted to the licensee (and optionally
                   to the exporter's recovery recipient)
    licence.json   the licence (vault.licence), naming both parties and the adapter's digests
    README.txt     what this is and how to check it, for the recipient
    model.sig      an OpenSSF model-signing signature (Sigstore bundle, DSSE in-toto statement
                   listing the sha256 of every other file), made with the exporter's ECDSA P-256 key

It verifies with the stock tool: ``model_signing verify key DIR --signature DIR/model.sig
--public_key signer.pub``. vault's own verification is stricter: exactly these four regular
files, size limits, a *trusted* signer, a licence that names that signer, is addressed to us
and has not expired - all without decrypting. Import then copies the bundle into the vault
directory (so nothing can change between checking and using it), decrypts in memory, checks the
plaintext digest and base against the licence, and stores it sealed in one step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from vault.errors import (
    AlreadyExistsError,
    BundleError,
    IntegrityError,
    LicenceError,
    NoIdentityError,
    SignatureError,
    UnknownNameError,
    UsageError,
    VaultError,
)
from vault import fingerprint as fingerprints
from vault.fsio import atomic_write, fsync_dir
from vault.identity import Identity, PublicIdentity, key_id_of, load_identity
from vault.licence import Licence, derive, format_time, licence_of, parse_licence
from vault.trust import TrustedSigner, TrustStore

__all__ = [
    "ADAPTER", "LICENCE", "README", "SIGNATURE", "BUNDLE_FILES", "LIMITS",
    "VerifiedBundle", "export_bundle", "write_bundle", "verify_bundle", "open_bundle", "import_bundle",
    "sign_bundle",
]

ADAPTER, LICENCE, README, SIGNATURE = "adapter.age", "licence.json", "README.txt", "model.sig"
BUNDLE_FILES = (ADAPTER, LICENCE, README, SIGNATURE)
LIMITS = {ADAPTER: 16 << 30, LICENCE: 64 << 10, README: 64 << 10, SIGNATURE: 1 << 20}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class VerifiedBundle:
    """What ``verify_bundle`` established. Every field has been checked, nothing was decrypted."""

    path: Path
    licence: Licence
    signer_name: str | None  # trusted-signer name, or None when checked against an explicit key
    signer_key_id: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"size", "sha256"}

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "valid": True,
            "signer": {"name": self.signer_name, "key_id": self.signer_key_id},
            "licence": self.licence.to_dict(),
            "files": self.files,
        }


# -- signing -----------------------------------------------------------------------


def _hashing_config():
    from model_signing import hashing

    # sha256 per file (the default): the only form the upstream CLI verifier reads back.
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE])


def sign_bundle(identity: Identity, directory: Path) -> None:
    """Write ``directory/model.sig``: a model-signing key signature over every file in ``directory``."""
    from model_signing import signing

    with identity.signing_key_file() as (key_path, password):
        try:
            (
                signing.Config()
                .use_elliptic_key_signer(private_key=key_path, password=password)
                .set_hashing_config(_hashing_config())
                .sign(directory, directory / SIGNATURE)
            )
        except (ValueError, OSError) as exc:
            raise SignatureError(f"failed to sign the bundle: {exc}") from None


@contextlib.contextmanager
def _public_key_file(pem: str):
    fd = os.memfd_create("vault-signer-pub", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem.encode("ascii"))
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _signature_key_hint(data: bytes) -> str:
    try:
        doc = json.loads(data)
        hint = doc["verificationMaterial"]["publicKey"]["hint"]
        envelope = doc["dsseEnvelope"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise SignatureError("model.sig is not a model-signing key signature (Sigstore bundle)") from None
    if not isinstance(hint, str) or len(hint) != 64 or not isinstance(envelope, dict):
        raise SignatureError("model.sig carries no public-key hint; it was not made by a key signer vault accepts")
    return hint.lower()


def _verify_signature(directory: Path, pem: str) -> None:
    from model_signing import verifying

    with _public_key_file(pem) as key_path:
        try:
            (
                verifying.Config()
                .use_elliptic_key_verifier(public_key=key_path)
                .set_hashing_config(_hashing_config())
                .verify(directory, directory / SIGNATURE)
            )
        except Exception as exc:  # noqa: BLE001 - model-signing raises ValueError, InvalidSignature, protobuf and JSON errors
            detail = "".join(ch for ch in str(exc) if ch.isprintable())[:200]
            raise SignatureError(f"the signature does not match the bundle ({detail or type(exc).__name__})") from None


# -- layout ------------------------------------------------------------------------


def _safe_name(name: str) -> str:
    shown = "".join(ch if ch.isprintable() else "?" for ch in name)[:60]
    return repr(shown)


def _check_layout(directory: Path) -> dict[str, int]:
    """Exactly the four bundle files, each a regular file (no symlinks) within its size limit."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise BundleError(f"no bundle at {directory}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{directory} is not a bundle directory")
    names = set(os.listdir(directory))
    for missing in BUNDLE_FILES:
        if missing not in names:
            raise BundleError(f"the bundle is missing {missing}")
    extra = sorted(names - set(BUNDLE_FILES))
    if extra:
        raise BundleError(f"the bundle holds an unexpected file {_safe_name(extra[0])}")
    sizes = {}
    for name in BUNDLE_FILES:
        st = os.lstat(directory / name)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{name} in the bundle is not a regular file")
        if st.st_size > LIMITS[name]:
            raise BundleError(f"{name} in the bundle is larger than {LIMITS[name]} bytes")
        if st.st_size == 0:
            raise BundleError(f"{name} in the bundle is empty")
        sizes[name] = st.st_size
    return sizes


def _read(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path.name} in the bundle is larger than {limit} bytes")
    return data


# -- verify --------------------------------------------------------------------------


def verify_bundle(
    path: Path | str,
    *,
    my_recipient: str | None,
    trusted: Sequence[TrustedSigner] = (),
    signer: PublicIdentity | None = None,
    now: datetime | None = None,
) -> VerifiedBundle:
    """Check a bundle without decrypting it.

    Order: layout and sizes; who signed it (a trusted signer, or exactly ``signer`` if given);
    the model-signing signature over every file; the licence schema; that the licence names
    the signing key as licensor; that it is addressed to ``my_recipient``; that it has not expired.

    Args:
        path: the bundle directory.
        my_recipient: this user's age recipient; None skips the "addressed to me" check
            (only for a licensor inspecting their own export).
        trusted: the trusted signers (``TrustStore.list()``).
        signer: check against this key instead of the trusted list (``--signer``).
        now: the current time (injected in tests).

    Raises:
        BundleError: wrong layout or sizes.
        SignatureError: untrusted signer, bad signature, or licence not issued by the signer.
        LicenceError: malformed, addressed to someone else, or expired.
    """
    directory = Path(path)
    _check_layout(directory)
    sig_bytes = _read(directory / SIGNATURE, LIMITS[SIGNATURE])
    hint = _signature_key_hint(sig_bytes)
    if signer is not None:
        if signer.key_id != hint:
            raise SignatureError(f"the bundle was not signed by the given key (it names key {hint[:16]}...)")
        signer_name, pem = None, signer.signing_key_pem
    else:
        match = next((s for s in trusted if s.key_id == hint), None)
        if match is None:
            raise SignatureError(
                f"the bundle is signed by a key you do not trust ({hint[:16]}...); "
                "add its owner with 'vault trust add NAME FILE' or pass --signer"
            )
        signer_name, pem = match.name, match.identity.signing_key_pem
    _verify_signature(directory, pem)
    licence = parse_licence(_read(directory / LICENCE, LIMITS[LICENCE]))
    if licence.licensor_key != key_id_of(pem):
        raise SignatureError("the licence names a different licensor than the key that signed the bundle")
    if my_recipient is not None and licence.licensee_recipient != my_recipient:
        raise LicenceError(
            f"this bundle is licensed to {licence.licensee_recipient}, not to you ({my_recipient})"
        )
    if licence.expired(now):
        raise LicenceError(f"the licence expired at {format_time(licence.expires)}")  # type: ignore[arg-type]
    signed = _signed_digests(sig_bytes)  # verified above: no need to hash the files a second time
    files = {
        name: {"size": (directory / name).stat().st_size,
               "sha256": signed.get(name) if name != SIGNATURE else hashlib.sha256(sig_bytes).hexdigest()}
        for name in BUNDLE_FILES
    }
    return VerifiedBundle(directory, licence, signer_name, key_id_of(pem), files)


def _signed_digests(sig_bytes: bytes) -> dict[str, str]:
    """file name -> sha256 from the in-toto statement of a model.sig that has already been verified."""
    import base64

    try:
        statement = json.loads(base64.b64decode(json.loads(sig_bytes)["dsseEnvelope"]["payload"]))
        return {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError):
        raise SignatureError("model.sig's statement does not list the bundle's files") from None


# -- export --------------------------------------------------------------------------


def _readme(licence: Licence, signer: PublicIdentity) -> str:
    uses = ", ".join(sorted(licence.uses))
    expires = format_time(licence.expires) if licence.expires else "never"
    return f"""This directory is a vault bundle: a personal LLM adapter shared under licence.

  adapter       {licence.adapter_name} (sha256 {licence.adapter_sha256})
  base model    {licence.base_name} (sha256 {licence.base_sha256})
  licensed to   {licence.licensee_recipient}
  permitted     {uses}
  expires       {expires}
  guard         {"required" if licence.guard_required else "optional"}
  signed by     key sha256:{signer.key_id}

adapter.age is encrypted to the licensee only; licence.json holds the full terms;
model.sig is an OpenSSF model-signing signature over every file here.

To use it (as the licensee), with the licensor's identity file:
  vault trust add LICENSOR licensor.identity
  vault verify THIS_DIR
  vault import THIS_DIR

To check the signature with the upstream tool (pip install model-signing):
  model_signing verify key THIS_DIR --signature THIS_DIR/model.sig --public_key licensor.pub
"""


def _resolve_recipient(to: PublicIdentity | str):
    from vault import age

    text = to.recipient if isinstance(to, PublicIdentity) else to
    if not text:
        raise UsageError("that identity has no age recipient to encrypt to")
    try:
        return age.X25519Recipient.from_string(text)
    except (ValueError, VaultError):
        raise UsageError("the licensee must be an age X25519 recipient (age1...) or a vault identity file") from None


def export_bundle(
    vault: Any,
    name: str,
    out_dir: Path | str,
    *,
    to: PublicIdentity | str,
    uses: Iterable[str] = ("chat",),
    expires: datetime | None = None,
    terms: str = "",
    guard_required: bool = True,
    include_recovery: bool = False,
    fingerprint: bool = True,
    now: datetime | None = None,
    progress: Progress = _quiet,
) -> tuple[Path, Licence]:
    """Write a signed, encrypted, licensed bundle of adapter ``name`` to ``out_dir`` (a new directory).

    A licensed (imported) adapter can be re-exported only if its licence permits ``share``; the
    new licence is clamped to the old one's uses, expiry and guard requirement.

    With ``fingerprint`` (the default) the exported weights carry this licence's keyed fingerprint
    (vault.fingerprint) and a sealed "fingerprint" record is kept, so ``vault trace`` can tell
    which licensee a leaked copy came from.

    Raises:
        AlreadyExistsError: ``out_dir`` exists.
        LicenceError: the adapter's own licence forbids sharing or the requested terms.
        UsageError: bad recipient.
    """
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise AlreadyExistsError(f"{out} already exists; choose a new directory for the bundle")
    if not out.parent.is_dir():
        raise UsageError(f"the directory {out.parent} does not exist")
    entry = vault.get(name)
    parent = licence_of(entry)
    if parent is not None:
        uses, expires, guard_required = derive(parent, uses=uses, expires=expires, guard_required=guard_required, now=now)
    recipients = [_resolve_recipient(to)]
    if include_recovery:
        recipients.append(_recovery_recipient(vault))
    identity = load_identity(vault.keys, create=True)
    progress("decrypting the adapter in memory")
    blob = vault.open(name)
    try:
        if hashlib.sha256(blob).hexdigest() != entry.sha256:
            raise IntegrityError(f"adapter '{name}' does not match its recorded digest")
        licence_id = secrets.token_hex(16)
        shared: bytes | bytearray = blob
        if fingerprint:
            progress("fingerprinting the weights for this licensee")
            shared = fingerprints.embed(blob, fingerprints.key_from(vault.keys), licence_id)
        licence = Licence.create(
            licence_id=licence_id,
            licensor_key=identity.public.key_id,
            licensor_recipient=identity.public.recipient,
            licensee_recipient=recipients[0].to_string(),
            adapter_name=name,
            adapter_sha256=hashlib.sha256(shared).hexdigest(),
            adapter_size=len(shared),
            base_name=entry.base_name,
            base_sha256=entry.base_sha256,
            uses=uses,
            expires=expires,
            guard_required=guard_required,
            terms=terms,
            parent=parent.id if parent else None,
            now=now,
        )
        if fingerprint:
            record = {"adapter": name, "adapter_sha256": entry.sha256, "licence": licence.to_dict()}
            vault.seal_record(fingerprints.RECORD_KIND, licence_id, json.dumps(record, sort_keys=True).encode())
        try:
            write_bundle(out, identity, shared, licence, recipients, progress=progress)
        except BaseException:
            if fingerprint:
                vault.remove_record(fingerprints.RECORD_KIND, licence_id)
            raise
    finally:
        _zero(blob)
    return out, licence


def write_bundle(
    out_dir: Path | str,
    identity: Identity,
    blob: bytes | bytearray,
    licence: Licence,
    recipients: Sequence[Any],
    *,
    progress: Progress = _quiet,
) -> Path:
    """Lay out and sign a bundle for an already-built licence (the core of :func:`export_bundle`).

    Files are written into a private staging directory next to ``out_dir`` and renamed into place
    only once signed, so a crash never leaves a half-written bundle under the requested name.

    Raises:
        AlreadyExistsError: ``out_dir`` exists.
        SignatureError: model-signing failed.
    """
    from vault import age

    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise AlreadyExistsError(f"{out} already exists; choose a new directory for the bundle")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        progress("encrypting to the licensee")
        atomic_write(staging / ADAPTER, lambda fh: age.encrypt_to_file(fh, blob, recipients))
        atomic_write(staging / LICENCE, licence.to_bytes())
        atomic_write(staging / README, _readme(licence, identity.public).encode())
        progress("signing with model-signing")
        sign_bundle(identity, staging)
        os.chmod(staging, 0o755)
        os.rename(staging, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _recovery_recipient(vault: Any):
    from vault import age

    text = getattr(vault, "config", {}).get("recovery_recipient")
    if not text:
        raise UsageError("this vault records no recovery recipient; export without --include-recovery")
    return age.X25519Recipient.from_string(text)


def _zero(buf: Any) -> None:
    if isinstance(buf, bytearray):
        buf[:] = bytes(len(buf))


# -- import ---------------------------------------------------------------------------


def _private_copy(src: Path, dst: Path) -> None:
    """Copy the bundle into a 0700 directory we own, so it cannot change between verify and use."""
    sizes = _check_layout(src)
    for name in BUNDLE_FILES:
        data_fd = os.open(src / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(data_fd, "rb") as fin:
            out_fd = os.open(dst / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(out_fd, "wb") as fout:
                copied = 0
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    copied += len(chunk)
                    if copied > LIMITS[name]:
                        raise BundleError(f"{name} in the bundle grew while it was being read")
                    fout.write(chunk)
        if copied != sizes[name]:
            raise BundleError(f"{name} in the bundle changed while it was being read")


def import_bundle(
    vault: Any,
    path: Path | str,
    *,
    name: str | None = None,
    now: datetime | None = None,
    progress: Progress = _quiet,
) -> Any:
    """Verify a bundle addressed to this user and store its adapter sealed, with its licence attached.

    Nothing is stored unless every check passes; the single write is ``vault.add_blob``.

    Returns:
        The new store Entry.

    Raises:
        BundleError, SignatureError, LicenceError: as :func:`verify_bundle`.
        IntegrityError: the adapter does not decrypt, or its digest/base differ from the licence.
        AlreadyExistsError: an adapter with that name exists (choose one with ``name=``).
    """
    identity = load_identity(vault.keys, create=False)
    trusted = TrustStore(vault.home, vault.keys).list()
    verified, blob = open_bundle(path, identity, trusted, now=now, progress=progress)
    try:
        target = name or verified.licence.adapter_name
        try:
            vault.get(target)
        except UnknownNameError:
            pass
        else:
            raise AlreadyExistsError(f"an adapter named '{target}' already exists; import with --name NEW")
        return vault.add_blob(target, blob, source="import", licence=verified.licence.to_dict())
    finally:
        _zero(blob)


def open_bundle(
    path: Path | str,
    identity: Identity,
    trusted: Sequence[TrustedSigner],
    *,
    now: datetime | None = None,
    progress: Progress = _quiet,
) -> tuple[VerifiedBundle, bytearray]:
    """Verify a bundle addressed to ``identity`` and return it with the adapter decrypted in memory.

    The bundle is first copied into a private directory, so no file can change between the
    signature check and the decryption. The caller zeroes the returned buffer when done.

    Raises:
        BundleError, SignatureError, LicenceError: as :func:`verify_bundle`.
        IntegrityError: the adapter does not decrypt, or its digest/size/base differ from the licence.
    """
    with tempfile.TemporaryDirectory(prefix=".vault-import-") as tmp:
        copy = Path(tmp)
        progress("copying the bundle")
        _private_copy(Path(path), copy)
        progress("verifying the signature and licence")
        verified = verify_bundle(copy, my_recipient=identity.public.recipient, trusted=trusted, now=now)
        progress("decrypting in memory and checking the digest")
        blob = _decrypt(copy / ADAPTER, identity)
        try:
            _check_plaintext(blob, verified.licence)
        except BaseException:
            _zero(blob)
            raise
    return replace(verified, path=Path(path)), blob


def _decrypt(path: Path, identity: Identity) -> bytearray:
    from vault import age

    ciphertext = _read(path, LIMITS[ADAPTER])
    try:
        return age.decrypt(ciphertext, [identity.age_identity])
    except NoIdentityError:
        raise IntegrityError("the adapter in this bundle is not encrypted to your identity") from None


def _check_plaintext(blob: bytearray, licence: Licence) -> None:
    from vault.adapter import load_blob

    if len(blob) != licence.adapter_size or hashlib.sha256(blob).hexdigest() != licence.adapter_sha256:
        raise IntegrityError("the adapter in this bundle does not match the digest in its licence")
    _, meta = load_blob(blob)
    if meta.base_sha256 != licence.base_sha256:
        raise IntegrityError("the adapter's base model differs from the one its licence names")

