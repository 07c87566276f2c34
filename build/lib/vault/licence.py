"""Licences: the terms under which a shared adapter may be used, and their enforcement.

A licence is a small JSON document (``licence.json`` in a bundle) with a strict schema:
who grants it (the licensor's signing key id and age recipient), to whom (the licensee's
age recipient), for which adapter and base (sha256 of the plaintext safetensors blob and of
the base GGUF, or "" if the adapter was stored without a base digest), which uses are permitted (``chat``, ``serve``, ``share``, ``merge``), when it
expires (UTC, ISO-8601, or never), whether the guard is required, and free-text terms.

The licence is only as good as the signature over it (see vault.bundle); this module parses
untrusted bytes with hard limits and never echoes the input back in an error. Time is always
injectable (``now=...``) so expiry is testable without sleeping.

Enforcement: :func:`enforce` is called by every load point of the runtime (run, serve,
export, merge). Unlicensed (locally created) adapters pass through untouched.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping

from vault.errors import LicenceError

__all__ = [
    "FORMAT",
    "USES",
    "MAX_LICENCE_BYTES",
    "MAX_TERMS_CHARS",
    "Licence",
    "parse_licence",
    "parse_time",
    "parse_expiry",
    "format_time",
    "licence_of",
    "enforce",
    "derive",
    "enforcing",
]

FORMAT = "vault-licence/1"
USES: tuple[str, ...] = ("chat", "serve", "share", "merge")
MAX_LICENCE_BYTES = 64 * 1024
MAX_TERMS_CHARS = 16 * 1024
MAX_NAME_CHARS = 128

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
# bech32 data charset; an X25519 age recipient is always 62 characters.
_AGE_RECIPIENT = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
# no control characters except tab and newline: licence text is shown in terminals.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

_TOP_KEYS = {
    "format", "id", "licensor", "licensee", "adapter", "base", "uses",
    "issued", "expires", "guard_required", "terms", "parent",
}
_SUBKEYS = {
    "licensor": {"signing_key", "recipient"},
    "licensee": {"recipient"},
    "adapter": {"name", "sha256", "size"},
    "base": {"name", "sha256"},
}


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def format_time(when: datetime) -> str:
    """Canonical licence time: UTC, second precision, ``Z`` suffix."""
    if when.tzinfo is None:
        raise ValueError("licence times must be timezone-aware")
    return when.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse a canonical licence time (``YYYY-MM-DDTHH:MM:SSZ``).

    Raises:
        LicenceError: not in canonical form or not a real date.
    """
    if not isinstance(text, str) or not _TIME.match(text):
        raise LicenceError("invalid licence: times must look like 2027-01-31T00:00:00Z (UTC)")
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise LicenceError("invalid licence: time is not a real date") from None


def parse_expiry(text: str, *, now: datetime | None = None) -> datetime | None:
    """Parse a user-given expiry: ``never``, ``30d``, ``2027-01-31`` (00:00 UTC) or a full ISO-8601 time.

    A time with an offset is converted to UTC; a time without one is taken as UTC.

    Raises:
        LicenceError: unreadable, or not in the future.
    """
    now = now or _utcnow()
    text = text.strip()
    if text.lower() == "never":
        return None
    m = re.fullmatch(r"(\d{1,5})d", text)
    if m:
        when = now + timedelta(days=int(m.group(1)))
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise LicenceError(
                f"cannot read expiry {text[:40]!r}: use 'never', a number of days like '30d', "
                "a date like 2027-01-31 (00:00 UTC) or 2027-01-31T12:00:00Z"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    when = when.astimezone(timezone.utc).replace(microsecond=0)
    if when <= now:
        raise LicenceError(f"expiry {format_time(when)} is not in the future")
    return when


@dataclass(frozen=True)
class Licence:
    """A parsed, schema-checked licence. Construct with :meth:`create` or :func:`parse_licence`."""

    id: str
    licensor_key: str  # sha256 hex of the licensor's PEM signing public key (= model-signing key hint)
    licensor_recipient: str
    licensee_recipient: str
    adapter_name: str
    adapter_sha256: str
    adapter_size: int
    base_name: str
    base_sha256: str
    uses: frozenset[str]
    issued: datetime
    expires: datetime | None
    guard_required: bool = True
    terms: str = ""
    parent: str | None = None  # id of the licence this one was derived from (re-export)

    # -- construction -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        *,
        licensor_key: str,
        licensor_recipient: str,
        licensee_recipient: str,
        adapter_name: str,
        adapter_sha256: str,
        adapter_size: int,
        base_name: str,
        base_sha256: str,
        uses: Iterable[str] = ("chat",),
        expires: datetime | None = None,
        guard_required: bool = True,
        terms: str = "",
        parent: str | None = None,
        now: datetime | None = None,
        licence_id: str | None = None,
    ) -> "Licence":
        """Build a new licence (fresh random id unless ``licence_id``), validated exactly as a parsed one would be.

        Raises:
            LicenceError: any field out of schema.
        """
        issued = (now or _utcnow()).astimezone(timezone.utc).replace(microsecond=0)
        lic = cls(
            id=licence_id or secrets.token_hex(16),
            licensor_key=licensor_key,
            licensor_recipient=licensor_recipient,
            licensee_recipient=licensee_recipient,
            adapter_name=adapter_name,
            adapter_sha256=adapter_sha256,
            adapter_size=adapter_size,
            base_name=base_name,
            base_sha256=base_sha256,
            uses=frozenset(uses),
            issued=issued,
            expires=expires.astimezone(timezone.utc).replace(microsecond=0) if expires else None,
            guard_required=guard_required,
            terms=terms,
            parent=parent,
        )
        if lic.expires is not None and lic.expires <= lic.issued:
            raise LicenceError("invalid licence: it would expire before it is issued")
        # round-trip through the strict parser: one definition of "valid"
        return parse_licence(lic.to_bytes())

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "licensor": {"signing_key": self.licensor_key, "recipient": self.licensor_recipient},
            "licensee": {"recipient": self.licensee_recipient},
            "adapter": {"name": self.adapter_name, "sha256": self.adapter_sha256, "size": self.adapter_size},
            "base": {"name": self.base_name, "sha256": self.base_sha256},
            "uses": [u for u in USES if u in self.uses],
            "issued": format_time(self.issued),
            "expires": format_time(self.expires) if self.expires else None,
            "guard_required": self.guard_required,
            "terms": self.terms,
            "parent": self.parent,
        }

    def to_bytes(self) -> bytes:
        """Canonical encoding (sorted keys, ASCII, trailing newline)."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Licence":
        """Validate an already-decoded licence (e.g. the copy stored in the sealed index)."""
        return _from_obj(data)

    # -- queries ------------------------------------------------------------------
    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or _utcnow()) >= self.expires

    def permits(self, use: str) -> bool:
        return use in self.uses


# -- parsing ----------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise LicenceError("invalid licence: a key appears twice")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise LicenceError(f"invalid licence: {name} is not allowed")


def parse_licence(data: bytes | bytearray | memoryview) -> Licence:
    """Parse and validate untrusted licence bytes.

    Raises:
        LicenceError: too large, not UTF-8 JSON, or out of schema; the message says which
            field was wrong, never the input itself.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("licence must be bytes")
    if len(data) > MAX_LICENCE_BYTES:
        raise LicenceError(f"invalid licence: larger than {MAX_LICENCE_BYTES} bytes")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise LicenceError("invalid licence: not UTF-8 text") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise LicenceError(f"invalid licence: not JSON (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise LicenceError("invalid licence: nested too deeply") from None
    return _from_obj(obj)


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj[key]
    # bool is an int subclass: require exact types so `true` is never a size.
    if type(value) not in (kind if isinstance(kind, tuple) else (kind,)):
        raise LicenceError(f"invalid licence: {where}{key} has the wrong type")
    return value


def _keys(obj: Any, expected: set[str], where: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise LicenceError(f"invalid licence: {where or 'the document'} must be an object")
    missing = expected - obj.keys()
    if missing:
        raise LicenceError(f"invalid licence: missing {where}{sorted(missing)[0]}")
    unknown = obj.keys() - expected
    if unknown:
        shown = sorted(unknown)[0]
        shown = shown if len(shown) <= 32 and not _CONTROL.search(shown) else "(unprintable)"
        raise LicenceError(f"invalid licence: unknown field {where}{shown}")
    return obj


def _text(value: str, what: str, limit: int, *, multiline: bool = False) -> str:
    if len(value) > limit:
        raise LicenceError(f"invalid licence: {what} is longer than {limit} characters")
    bad = _CONTROL.search(value) or (not multiline and ("\n" in value or "\t" in value))
    if bad:
        raise LicenceError(f"invalid licence: {what} contains control characters")
    return value


def _hex64(value: str, what: str) -> str:
    if not _HEX64.match(value):
        raise LicenceError(f"invalid licence: {what} must be 64 lowercase hex digits")
    return value


def _base_digest(value: str) -> str:
    # "" when the adapter was added without a known base file; the adapter digest still binds it.
    return value if value == "" else _hex64(value, "base.sha256")


def _recipient(value: str, what: str) -> str:
    if not _AGE_RECIPIENT.match(value):
        raise LicenceError(f"invalid licence: {what} is not an age X25519 recipient (age1...)")
    return value


def _from_obj(obj: Any) -> Licence:
    top = _keys(obj, _TOP_KEYS, "")
    if _field(top, "format", str, "") != FORMAT:
        raise LicenceError(f"invalid licence: format must be {FORMAT!r}")
    lid = _field(top, "id", str, "")
    if not _HEX32.match(lid):
        raise LicenceError("invalid licence: id must be 32 lowercase hex digits")
    sub = {k: _keys(top[k], keys, f"{k}.") for k, keys in _SUBKEYS.items()}
    size = _field(sub["adapter"], "size", int, "adapter.")
    if not 0 < size < 1 << 40:
        raise LicenceError("invalid licence: adapter.size is out of range")
    uses_raw = _field(top, "uses", list, "")
    if not uses_raw or len(uses_raw) > len(USES) or any(type(u) is not str or u not in USES for u in uses_raw):
        raise LicenceError(f"invalid licence: uses must be a non-empty list drawn from {', '.join(USES)}")
    if len(set(uses_raw)) != len(uses_raw):
        raise LicenceError("invalid licence: uses lists a use twice")
    expires_raw = _field(top, "expires", (str, type(None)), "")
    parent = _field(top, "parent", (str, type(None)), "")
    if parent is not None and not _HEX32.match(parent):
        raise LicenceError("invalid licence: parent must be a licence id (32 hex digits)")
    issued = parse_time(_field(top, "issued", str, ""))
    expires = parse_time(expires_raw) if expires_raw is not None else None
    if expires is not None and expires <= issued:
        raise LicenceError("invalid licence: it expires before it was issued")
    return Licence(
        id=lid,
        licensor_key=_hex64(_field(sub["licensor"], "signing_key", str, "licensor."), "licensor.signing_key"),
        licensor_recipient=_recipient(_field(sub["licensor"], "recipient", str, "licensor."), "licensor.recipient"),
        licensee_recipient=_recipient(_field(sub["licensee"], "recipient", str, "licensee."), "licensee.recipient"),
        adapter_name=_text(_field(sub["adapter"], "name", str, "adapter."), "adapter.name", MAX_NAME_CHARS) or _empty("adapter.name"),
        adapter_sha256=_hex64(_field(sub["adapter"], "sha256", str, "adapter."), "adapter.sha256"),
        adapter_size=size,
        base_name=_text(_field(sub["base"], "name", str, "base."), "base.name", MAX_NAME_CHARS) or _empty("base.name"),
        base_sha256=_base_digest(_field(sub["base"], "sha256", str, "base.")),
        uses=frozenset(uses_raw),
        issued=issued,
        expires=expires,
        guard_required=_field(top, "guard_required", bool, ""),
        terms=_text(_field(top, "terms", str, ""), "terms", MAX_TERMS_CHARS, multiline=True),
        parent=parent,
    )


def _empty(what: str) -> str:
    raise LicenceError(f"invalid licence: {what} is empty")


# -- enforcement ------------------------------------------------------------------


def licence_of(subject: Any) -> Licence | None:
    """The licence attached to an Entry (``.licence``), a licence dict, or a Licence; None if unlicensed.

    Raises:
        LicenceError: the attached licence is malformed (treated as a refusal, never as "no licence").
    """
    if subject is None or isinstance(subject, Licence):
        return subject
    if isinstance(subject, Mapping):
        return Licence.from_dict(subject)
    if hasattr(subject, "licence"):
        return licence_of(subject.licence)
    raise TypeError(f"cannot find a licence on {type(subject).__name__}")


def enforce(
    subject: Any,
    use: str,
    *,
    now: datetime | None = None,
    guard_enabled: bool = True,
    audit_forced: bool = False,
) -> Licence | None:
    """Refuse a use the licence does not permit. Call at every load point, before any decryption.

    Args:
        subject: an Entry (its ``licence`` field), a licence dict, a Licence, or None.
        use: one of ``chat``, ``serve``, ``share``, ``merge``.
        now: the current time (injected in tests).
        guard_enabled: False when the caller is about to run with the guard off.
        audit_forced: True when the caller is about to skip or override the adapter audit.

    Returns:
        The licence, or None when the subject is not licensed (everything is allowed).

    Raises:
        LicenceError: expired, use not permitted, or the guard would be disabled/forced
            while the licence requires it.
    """
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; expected one of {USES}")
    lic = licence_of(subject)
    if lic is None:
        return None
    name = lic.adapter_name
    if lic.expired(now):
        raise LicenceError(f"the licence for '{name}' expired at {format_time(lic.expires)}")  # type: ignore[arg-type]
    if not lic.permits(use):
        allowed = ", ".join(u for u in USES if u in lic.uses)
        raise LicenceError(f"the licence for '{name}' does not permit '{use}' (it permits: {allowed})")
    if lic.guard_required and not guard_enabled:
        raise LicenceError(f"the licence for '{name}' requires the guard; it cannot be disabled")
    if lic.guard_required and audit_forced:
        raise LicenceError(f"the licence for '{name}' requires the adapter audit; --force is refused")
    return lic


def derive(
    parent: Licence,
    *,
    uses: Iterable[str],
    expires: datetime | None,
    guard_required: bool,
    now: datetime | None = None,
) -> tuple[frozenset[str], datetime | None, bool]:
    """Clamp the terms of a re-export so they never exceed the licence it was received under.

    Returns the (uses, expires, guard_required) to put in the derived licence.

    Raises:
        LicenceError: the parent does not permit 'share', or the request asks for more than it grants.
    """
    enforce(parent, "share", now=now)
    wanted = frozenset(uses)
    extra = wanted - parent.uses
    if extra:
        raise LicenceError(
            f"the licence for '{parent.adapter_name}' does not let you grant '{sorted(extra)[0]}'"
        )
    if parent.expires is not None and (expires is None or expires > parent.expires):
        expires = parent.expires
    return wanted, expires, guard_required or parent.guard_required



def enforcing(
    fn: Callable[..., Any],
    licensed: Mapping[str, Any],
    use: str,
    *,
    clock: Callable[[], datetime] = _utcnow,
) -> Callable[..., Any]:
    """Wrap ``fn(*args, adapter=NAME, **kw)`` so that every call first enforces NAME's licence.

    This is how a long-running ``serve`` re-checks expiry: the licences are captured once at start
    (``{name: entry}``) and checked against ``clock()`` on every request, so a licence that expires
    while the server runs stops the next request for that adapter (LicenceError) without a restart.
    """
    if use not in USES:
        raise ValueError(f"unknown use {use!r}; expected one of {USES}")

    def wrapped(*args: Any, adapter: str | None = None, **kwargs: Any) -> Any:
        if adapter is not None and adapter in licensed:
            enforce(licensed[adapter], use, now=clock())
        return fn(*args, adapter=adapter, **kwargs)

    return wrapped
