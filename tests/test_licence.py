"""Licence schema, limits and enforcement (vault/licence.py), with an injected clock."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vault.errors import LicenceError
from vault.licence import (
    MAX_LICENCE_BYTES,
    Licence,
    derive,
    enforce,
    enforcing,
    format_time,
    parse_expiry,
    parse_licence,
)

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
BOB = "age1" + "q" * 58
ALICE = "age1" + "p" * 58


def make(**kw) -> Licence:
    args = dict(
        licensor_key="a" * 64,
        licensor_recipient=ALICE,
        licensee_recipient=BOB,
        adapter_name="alice-voice",
        adapter_sha256="b" * 64,
        adapter_size=1234,
        base_name="SmolLM2-135M-Instruct",
        base_sha256="c" * 64,
        uses=("chat",),
        expires=T0 + timedelta(days=30),
        terms="personal use only.\nno resale.",
        now=T0,
    )
    args.update(kw)
    return Licence.create(**args)


def test_roundtrip_is_canonical_and_strict():
    lic = make(uses=("serve", "chat"))
    raw = lic.to_bytes()
    again = parse_licence(raw)
    assert again == lic
    assert again.to_bytes() == raw
    doc = json.loads(raw)
    assert doc["uses"] == ["chat", "serve"]  # canonical order
    assert doc["guard_required"] is True  # default
    assert doc["expires"] == "2026-12-25T12:00:00Z"


def _mutate(field_path: str, value):
    doc = json.loads(make().to_bytes())
    target = doc
    *parents, last = field_path.split(".")
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "field_path,value,needle",
    [
        ("format", "vault-licence/2", "format"),
        ("uses", ["chat", "fly"], "uses"),
        ("uses", [], "uses"),
        ("uses", ["chat", "chat"], "twice"),
        ("adapter.size", True, "adapter.size has the wrong type"),
        ("adapter.size", 0, "out of range"),
        ("adapter.sha256", "B" * 64, "adapter.sha256"),
        ("base.sha256", "c" * 63, "base.sha256"),
        ("licensee.recipient", "age1short", "licensee.recipient"),
        ("guard_required", 1, "guard_required has the wrong type"),
        ("expires", "2026-12-25 12:00:00", "times must look like"),
        ("expires", "2026-02-30T00:00:00Z", "not a real date"),
        ("expires", "2026-01-01T00:00:00Z", "expires before it was issued"),
        ("terms", "x" * 20000, "terms is longer"),
        ("terms", "ok\x1b[2Jcleared", "control characters"),
        ("adapter.name", "two\nlines", "control characters"),
        ("adapter.name", "", "adapter.name is empty"),
        ("base", KeyError, "missing base"),
        ("extra", 1, "unknown field extra"),
        ("licensor.extra", 1, "unknown field licensor.extra"),
    ],
)
def test_schema_rejections_say_what_is_wrong(field_path, value, needle):
    with pytest.raises(LicenceError) as err:
        parse_licence(_mutate(field_path, value))
    assert needle in err.value.message


def test_parser_limits():
    with pytest.raises(LicenceError, match="larger than"):
        parse_licence(b" " * (MAX_LICENCE_BYTES + 1))
    with pytest.raises(LicenceError, match="not UTF-8"):
        parse_licence(b"\xff\xfe{}")
    with pytest.raises(LicenceError, match="twice"):
        parse_licence(b'{"id": "a", "id": "b"}')
    with pytest.raises(LicenceError, match="not allowed"):
        parse_licence(b'{"size": NaN}')
    with pytest.raises(LicenceError, match="nested too deeply|must be an object"):
        parse_licence(b"[" * 30000 + b"]" * 30000)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_bytes_never_traceback(data):
    try:
        parse_licence(data)
    except LicenceError as exc:
        assert exc.message.startswith("invalid licence")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.sampled_from(sorted(json.loads(make().to_bytes()))), _json)
def test_fuzz_one_field_replaced(key, value):
    doc = json.loads(make().to_bytes())
    doc[key] = value
    try:
        lic = parse_licence(json.dumps(doc).encode())
    except LicenceError as exc:
        assert exc.message.startswith("invalid licence")
    else:  # accepted only if the value is itself valid for that field
        assert lic.to_dict()[key] == value or key == "uses"


def test_enforce_uses_expiry_and_guard():
    lic = make(uses=("chat", "serve"))
    assert enforce(None, "serve") is None  # unlicensed: everything allowed
    assert enforce(lic, "chat", now=T0) is lic
    assert enforce(lic.to_dict(), "serve", now=T0) == lic
    with pytest.raises(LicenceError, match="does not permit 'share'"):
        enforce(lic, "share", now=T0)
    with pytest.raises(LicenceError, match="does not permit 'merge'"):
        enforce(lic, "merge", now=T0)
    # the clock is injected: one second before expiry passes, at expiry it fails
    enforce(lic, "chat", now=lic.expires - timedelta(seconds=1))
    with pytest.raises(LicenceError, match="expired at 2026-12-25T12:00:00Z"):
        enforce(lic, "chat", now=lic.expires)
    with pytest.raises(LicenceError, match="requires the guard"):
        enforce(lic, "chat", now=T0, guard_enabled=False)
    with pytest.raises(LicenceError, match="--force is refused"):
        enforce(lic, "chat", now=T0, audit_forced=True)
    relaxed = make(guard_required=False)
    enforce(relaxed, "chat", now=T0, guard_enabled=False, audit_forced=True)
    with pytest.raises(ValueError):
        enforce(lic, "fly", now=T0)


def test_enforce_on_entry_like_object_and_corrupt_attached_licence():
    class Entry:
        licence = make().to_dict()

    enforce(Entry(), "chat", now=T0)
    Entry.licence = {"format": "nope"}
    with pytest.raises(LicenceError):  # a damaged licence refuses, never silently "unlicensed"
        enforce(Entry(), "chat", now=T0)


def test_never_expiring_licence():
    lic = make(expires=None)
    assert lic.to_dict()["expires"] is None
    enforce(lic, "chat", now=T0 + timedelta(days=36500))


def test_derive_clamps_reexport_terms():
    parent = make(uses=("chat", "serve", "share"))
    uses, expires, guard = derive(parent, uses=("chat",), expires=None, guard_required=False, now=T0)
    assert uses == {"chat"} and expires == parent.expires and guard is True
    with pytest.raises(LicenceError, match="does not let you grant 'merge'"):
        derive(parent, uses=("chat", "merge"), expires=None, guard_required=True, now=T0)
    with pytest.raises(LicenceError, match="does not permit 'share'"):
        derive(make(), uses=("chat",), expires=None, guard_required=True, now=T0)


def test_parse_expiry_forms():
    assert parse_expiry("never", now=T0) is None
    assert parse_expiry("30d", now=T0) == T0 + timedelta(days=30)
    assert format_time(parse_expiry("2027-01-31", now=T0)) == "2027-01-31T00:00:00Z"
    assert format_time(parse_expiry("2027-01-31T12:00:00+02:00", now=T0)) == "2027-01-31T10:00:00Z"
    with pytest.raises(LicenceError, match="not in the future"):
        parse_expiry("2020-01-01", now=T0)
    with pytest.raises(LicenceError, match="cannot read expiry"):
        parse_expiry("next tuesday", now=T0)


def test_enforcing_rechecks_expiry_on_every_call():
    """A serve session that outlives the licence: the next request for that adapter is refused."""
    lic = make(uses=("chat", "serve"))
    clock = [T0]
    calls = []

    def respond(messages, *, adapter=None, max_tokens=16):
        calls.append((adapter, max_tokens))
        return "ok"

    wrapped = enforcing(respond, {"alice-voice": lic.to_dict()}, "serve", clock=lambda: clock[0])
    assert wrapped(["hi"], adapter="alice-voice", max_tokens=3) == "ok"
    assert wrapped(["hi"], adapter=None) == "ok"  # the base model is not licensed
    clock[0] = lic.expires
    with pytest.raises(LicenceError, match="expired"):
        wrapped(["hi"], adapter="alice-voice")
    assert wrapped(["hi"], adapter="own-adapter") == "ok"
    assert calls == [("alice-voice", 3), (None, 16), ("own-adapter", 16)]
    chat_only = make(uses=("chat",))
    with pytest.raises(LicenceError, match="does not permit 'serve'"):
        enforcing(respond, {"a": chat_only}, "serve", clock=lambda: T0)([], adapter="a")
