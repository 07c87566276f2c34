"""Identity, trust and bundles at the library level (vault/identity.py, vault/trust.py, vault/bundle.py).

Real components throughout: a real gnome-keyring (keyring_env), real age encryption, the real
model-signing library, and the upstream ``model_signing`` CLI as a subprocess. alice, bob and
carol each get their own vault id (own keyring namespace, own trust file); the end-to-end test
with fully separate keyrings and homes lives in tests/test_share_cli.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_adapters import BASE_NAME, lora_tensors
from vault import age
from vault.adapter import make_blob
from vault.bundle import (
    ADAPTER,
    BUNDLE_FILES,
    LICENCE,
    README,
    SIGNATURE,
    open_bundle,
    verify_bundle,
    write_bundle,
)
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
from vault.identity import SIGNING_KEY, PublicIdentity, load_identity
from vault.keys import KeyStore
from vault.licence import Licence
from vault.trust import TRUST_DIGEST, TrustStore

T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
BASE_SHA = "d" * 64
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": BASE_NAME}


class Person:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.home = root / name
        self.home.mkdir(mode=0o700, parents=True)
        self.keys = KeyStore(f"test-{name}-{os.urandom(4).hex()}")
        self.identity = load_identity(self.keys, create=True)
        self.trust = TrustStore(self.home, self.keys)


@pytest.fixture
def people(keyring_env, tmp_path):
    return {n: Person(n, tmp_path / "people") for n in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def blob() -> bytes:
    return make_blob(lora_tensors(r=4, targets=["q_proj"], layers=range(4)), CONFIG, base_name=BASE_NAME, base_sha256=BASE_SHA)


def _licence(alice: Person, bob: Person, blob: bytes, **kw) -> Licence:
    args = dict(
        licensor_key=alice.identity.public.key_id,
        licensor_recipient=alice.identity.public.recipient,
        licensee_recipient=bob.identity.public.recipient,
        adapter_name="alice-voice",
        adapter_sha256=hashlib.sha256(blob).hexdigest(),
        adapter_size=len(blob),
        base_name=BASE_NAME,
        base_sha256=BASE_SHA,
        uses=("chat",),
        expires=T0 + timedelta(days=30),
        terms="for bob only",
        now=T0,
    )
    args.update(kw)
    return Licence.create(**args)


def _export(alice: Person, bob: Person, blob: bytes, out: Path, **kw) -> Path:
    lic = _licence(alice, bob, blob, **kw)
    return write_bundle(out, alice.identity, blob, lic, [age.X25519Recipient.from_string(bob.identity.public.recipient)])


# -- identity ------------------------------------------------------------------------------


def test_identity_lives_in_the_keyring_and_is_stable(people):
    alice = people["alice"]
    again = load_identity(alice.keys)
    assert again.public == alice.identity.public
    assert alice.identity.public.recipient.startswith("age1")
    assert "BEGIN PUBLIC KEY" in alice.identity.public.signing_key_pem
    assert alice.keys.get(SIGNING_KEY).startswith("-----BEGIN PRIVATE KEY-----")
    assert not any(alice.home.iterdir())  # nothing private on disk
    text = alice.identity.public.to_text()
    assert PublicIdentity.parse(text) == alice.identity.public
    bare = PublicIdentity.parse(alice.identity.public.signing_key_pem)
    assert bare.recipient is None and bare.key_id == alice.identity.public.key_id


def test_identity_without_create_is_refused(keyring_env):
    with pytest.raises(UsageError, match="run 'vault identity'"):
        load_identity(KeyStore("test-nobody-" + os.urandom(4).hex()))


def test_damaged_signing_key_in_keyring(people):
    alice = people["alice"]
    alice.keys.set(SIGNING_KEY, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IntegrityError, match="signing key"):
        load_identity(alice.keys)


def test_signing_key_reaches_model_signing_only_through_memfd(people):
    with people["alice"].identity.signing_key_file() as (path, password):
        assert path.startswith("/proc/self/fd/")
        target = os.readlink(path)
        assert target.startswith("/memfd:vault-signing-key")
        assert isinstance(password, bytes)
        assert b"ENCRYPTED PRIVATE KEY" in Path(path).read_bytes()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(st.binary(max_size=1024) | st.text(max_size=1024).map(str.encode))
def test_fuzz_identity_file_gives_usage_errors(data):
    try:
        PublicIdentity.parse(data)
    except UsageError:
        pass


# -- trust -----------------------------------------------------------------------------------


def test_trust_add_list_remove(people):
    bob, alice = people["bob"], people["alice"]
    bob.trust.add("alice", alice.identity.public, now=T0)
    [signer] = bob.trust.list()
    assert (signer.name, signer.key_id, signer.added) == ("alice", alice.identity.public.key_id, "2026-11-25T12:00:00Z")
    assert oct(os.stat(bob.trust.path).st_mode & 0o777) == "0o600"
    with pytest.raises(AlreadyExistsError):
        bob.trust.add("alice", people["carol"].identity.public)
    with pytest.raises(AlreadyExistsError, match="already trusted as 'alice'"):
        bob.trust.add("alice2", alice.identity.public)
    with pytest.raises(UsageError):
        bob.trust.add("Bad Name", alice.identity.public)
    bob.trust.remove("alice")
    assert bob.trust.list() == []
    with pytest.raises(UnknownNameError):
        bob.trust.remove("alice")


def test_trust_file_edits_are_detected(people):
    bob, alice, carol = people["bob"], people["alice"], people["carol"]
    bob.trust.add("alice", alice.identity.public)
    doc = json.loads(bob.trust.path.read_bytes())
    # an attacker with file access swaps in carol's key under alice's name
    doc["signers"][0]["public_key"] = carol.identity.public.signing_key_pem
    bob.trust.path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="changed outside vault"):
        bob.trust.list()


def test_trust_rollback_is_detected(people):
    bob, alice, carol = people["bob"], people["alice"], people["carol"]
    bob.trust.add("alice", alice.identity.public)
    bob.trust.add("carol", carol.identity.public)
    old = bob.trust.path.read_bytes()
    bob.trust.remove("carol")  # bob stops trusting carol
    bob.trust.path.write_bytes(old)  # an attacker restores the old file
    with pytest.raises(IntegrityError):
        bob.trust.list()


def test_trust_file_planted_without_anchor(people):
    carol, bob = people["carol"], people["bob"]
    bob.trust.add("alice", people["alice"].identity.public)
    shutil.copy(bob.trust.path, carol.trust.path)  # carol's vault never wrote a trust list
    with pytest.raises(IntegrityError, match="not written by this vault"):
        carol.trust.list()


def test_trust_write_interrupted_after_anchor_rolls_forward(people):
    bob, alice = people["bob"], people["alice"]
    bob.trust.add("alice", alice.identity.public)
    # simulate a crash after the keyring anchor moved but before the rename
    new = bob.trust.path.read_bytes().replace(b'"alice"', b'"alice-x"')
    bob.trust.pending.write_bytes(new)
    bob.keys.set(TRUST_DIGEST, hashlib.sha256(new).hexdigest())
    assert [s.name for s in bob.trust.list()] == ["alice-x"]
    assert not bob.trust.pending.exists()


# -- bundles -----------------------------------------------------------------------------------


def test_bundle_layout_and_roundtrip(people, blob, tmp_path):
    alice, bob = people["alice"], people["bob"]
    out = _export(alice, bob, blob, tmp_path / "b")
    assert sorted(os.listdir(out)) == sorted(BUNDLE_FILES)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # staging dir gone
    assert blob not in (out / ADAPTER).read_bytes()
    sig = json.loads((out / SIGNATURE).read_bytes())
    assert sig["verificationMaterial"]["publicKey"]["hint"] == alice.identity.public.key_id
    statement = json.loads(__import__("base64").b64decode(sig["dsseEnvelope"]["payload"]))
    listed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    assert listed == {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in (ADAPTER, LICENCE, README)}
    bob.trust.add("alice", alice.identity.public)
    verified = verify_bundle(out, my_recipient=bob.identity.public.recipient, trusted=bob.trust.list(), now=T0)
    assert verified.signer_name == "alice" and verified.licence.adapter_name == "alice-voice"
    assert verified.files == {n: {"size": (out / n).stat().st_size, "sha256": hashlib.sha256((out / n).read_bytes()).hexdigest()}
                              for n in BUNDLE_FILES}
    got, plain = open_bundle(out, bob.identity, bob.trust.list(), now=T0)
    assert bytes(plain) == blob


def test_upstream_model_signing_cli_verifies(people, blob, tmp_path):
    alice, bob = people["alice"], people["bob"]
    out = _export(alice, bob, blob, tmp_path / "b")
    pub = tmp_path / "alice.pub"
    pub.write_text(alice.identity.public.signing_key_pem)
    cmd = [sys.executable, "-m", "model_signing", "verify", "key", str(out), "--signature", str(out / SIGNATURE), "--public_key", str(pub)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "Verification succeeded" in ok.stdout
    # and the stock tool rejects a flipped byte, so the check above can fail
    data = bytearray((out / LICENCE).read_bytes())
    data[10] ^= 1
    (out / LICENCE).write_bytes(data)
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    # carol's key does not verify alice's bundle either
    pub.write_text(people["carol"].identity.public.signing_key_pem)
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode != 0


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)


TAMPERS = [(f, op) for f in BUNDLE_FILES for op in ("flip", "remove", "rename")] + [
    ("extra.txt", "add"),
    (".gitignore", "add"),  # model-signing ignores git files; vault must not
    ("sub", "adddir"),
    (ADAPTER, "symlink"),
]


@pytest.mark.parametrize("name,op", TAMPERS, ids=[f"{op}-{n}" for n, op in TAMPERS])
def test_every_tamper_is_rejected(people, blob, tmp_path, name, op):
    alice, bob = people["alice"], people["bob"]
    out = _export(alice, bob, blob, tmp_path / "b")
    bob.trust.add("alice", alice.identity.public)
    target = out / name
    if op == "flip":
        _flip(target)
    elif op == "remove":
        target.unlink()
    elif op == "rename":
        target.rename(out / (name + ".orig"))
    elif op == "add":
        target.write_text("surprise")
    elif op == "adddir":
        target.mkdir()
    elif op == "symlink":
        moved = tmp_path / "elsewhere.age"
        target.rename(moved)
        target.symlink_to(moved)
    with pytest.raises((BundleError, SignatureError, LicenceError, IntegrityError)) as err:
        verify_bundle(out, my_recipient=bob.identity.public.recipient, trusted=bob.trust.list(), now=T0)
    assert err.value.message
    with pytest.raises(VaultError):
        open_bundle(out, bob.identity, bob.trust.list(), now=T0)


def test_untrusted_signer_foreign_recipient_and_expiry(people, blob, tmp_path):
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    out = _export(alice, bob, blob, tmp_path / "b")
    with pytest.raises(SignatureError, match="key you do not trust"):
        verify_bundle(out, my_recipient=bob.identity.public.recipient, trusted=[], now=T0)
    # --signer with the right key works without trusting; with a wrong key it does not
    verify_bundle(out, my_recipient=bob.identity.public.recipient, signer=alice.identity.public, now=T0)
    with pytest.raises(SignatureError, match="not signed by the given key"):
        verify_bundle(out, my_recipient=bob.identity.public.recipient, signer=carol.identity.public, now=T0)
    # carol trusts alice but the bundle is not hers, and she cannot decrypt it either
    carol.trust.add("alice", alice.identity.public)
    with pytest.raises(LicenceError, match="not to you"):
        open_bundle(out, carol.identity, carol.trust.list(), now=T0)
    with pytest.raises(NoIdentityError):
        age.decrypt((out / ADAPTER).read_bytes(), [carol.identity.age_identity])
    bob.trust.add("alice", alice.identity.public)
    expires = T0 + timedelta(days=30)
    verify_bundle(out, my_recipient=bob.identity.public.recipient, trusted=bob.trust.list(), now=expires - timedelta(seconds=1))
    with pytest.raises(LicenceError, match="expired at 2026-12-25T12:00:00Z"):
        open_bundle(out, bob.identity, bob.trust.list(), now=expires)


def test_resigned_by_another_key_is_rejected(people, blob, tmp_path):
    """carol re-signs alice's bundle with her own key: the licence still names alice as licensor."""
    from vault.bundle import sign_bundle

    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    out = _export(alice, bob, blob, tmp_path / "b")
    (out / SIGNATURE).unlink()
    sign_bundle(carol.identity, out)
    bob.trust.add("carol", carol.identity.public)
    with pytest.raises(SignatureError, match="different licensor"):
        verify_bundle(out, my_recipient=bob.identity.public.recipient, trusted=bob.trust.list(), now=T0)


def test_signed_licence_with_wrong_digest_is_refused_after_decrypt(people, blob, tmp_path):
    """A correctly signed bundle whose licence digest does not match the adapter: import refuses."""
    alice, bob = people["alice"], people["bob"]
    out = _export(alice, bob, blob, tmp_path / "b", adapter_sha256="e" * 64)
    bob.trust.add("alice", alice.identity.public)
    verify_bundle(out, my_recipient=bob.identity.public.recipient, trusted=bob.trust.list(), now=T0)  # no decryption
    with pytest.raises(IntegrityError, match="does not match the digest"):
        open_bundle(out, bob.identity, bob.trust.list(), now=T0)


def test_existing_output_directory_is_not_overwritten(people, blob, tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(AlreadyExistsError):
        _export(people["alice"], people["bob"], blob, tmp_path / "b")


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], deadline=None)
@given(
    files=st.dictionaries(
        st.sampled_from([*BUNDLE_FILES, "x", ".git"]),
        st.binary(max_size=300) | st.sampled_from([b"{}", b"[]", b'{"verificationMaterial": {"publicKey": {"hint": "' + b"a" * 64 + b'"}}, "dsseEnvelope": {}}']),
        max_size=6,
    )
)
def test_fuzz_malformed_bundle_dirs_give_vault_errors(tmp_path_factory, files):
    out = tmp_path_factory.mktemp("fuzz")
    for name, data in files.items():
        (out / name).write_bytes(data)
    recipient = "age1" + "q" * 58
    with pytest.raises(VaultError) as err:
        verify_bundle(out, my_recipient=recipient, trusted=[], now=T0)
    assert isinstance(err.value, (BundleError, SignatureError, LicenceError))


def test_include_recovery_decrypts_with_the_stock_age_cli(keyring_env, tmp_path, blob):
    """--include-recovery: the exporter's paper recovery key opens adapter.age with plain `age -d`."""
    from vault.bundle import export_bundle
    from vault.store import Vault

    alice, recovery = Vault.create(tmp_path / "alice")
    alice.add_blob("voice", blob)
    bob_recipient = age.X25519Identity.generate().recipient.to_string()
    out, lic = export_bundle(alice, "voice", tmp_path / "b", to=bob_recipient, include_recovery=True)
    key = tmp_path / "recovery.key"
    key.write_text(recovery + "\n")
    plain = subprocess.run(["age", "-d", "-i", str(key), str(out / ADAPTER)], capture_output=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert hashlib.sha256(plain.stdout).hexdigest() == lic.adapter_sha256
    assert plain.stdout != blob and len(plain.stdout) == len(blob)  # fingerprinted for this licensee (default)
    out2, _ = export_bundle(alice, "voice", tmp_path / "b2", to=bob_recipient)  # default: licensee only
    assert subprocess.run(["age", "-d", "-i", str(key), str(out2 / ADAPTER)], capture_output=True, timeout=60).returncode != 0


# -- the licence in the runtime -------------------------------------------------------------------


@pytest.mark.slow
def test_licensed_adapter_in_the_real_runtime_and_server(keyring_env, tmp_path):
    """bob runs alice's adapter under licence: refused with the pass-through guard, loaded with the
    real guard, served over HTTP (real openai client) until the licence expires mid-session (403)."""
    import functools

    import openai

    from fixtures_adapters import make_peft_adapter
    from runtime import loader
    from runtime.chat import respond
    from runtime.guard.base import PassThroughGuard
    from runtime.models import default_model
    from runtime.server import ChatServer
    from vault.bundle import export_bundle, import_bundle
    from vault.licence import enforcing
    from vault.store import Vault

    base = default_model()
    alice, _ = Vault.create(tmp_path / "alice")
    bob, _ = Vault.create(tmp_path / "bob")
    adapter = make_peft_adapter(tmp_path / "peft", r=4, targets=["q_proj", "v_proj"], layers=range(4), seed=3)
    alice.add("voice", adapter, base_name=base.name, base_sha256=base.sha256)
    a_id, b_id = load_identity(alice.keys, create=True), load_identity(bob.keys, create=True)
    TrustStore(bob.home, bob.keys).add("alice", a_id.public)
    expires = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=1)
    export_bundle(alice, "voice", tmp_path / "serve-ok", to=b_id.public.recipient, uses=("chat", "serve"), expires=expires)
    export_bundle(alice, "voice", tmp_path / "chat-only", to=b_id.public.recipient, uses=("chat",))
    entry = import_bundle(bob, tmp_path / "serve-ok", name="voice")
    import_bundle(bob, tmp_path / "chat-only", name="voice-chat")

    engine = loader.open_engine()
    with pytest.raises(LicenceError, match="requires the guard"):
        loader.attach(engine, bob, "voice", guard=PassThroughGuard())
    with pytest.raises(LicenceError, match="does not permit 'serve'"):
        loader.attach(engine, bob, "voice-chat", guard=PassThroughGuard(), use="serve")
    guard = loader.default_guard(bob)  # as `vault serve` does: static audit, screening on
    loader.attach(engine, bob, "voice", guard=guard, use="serve")

    clock = [datetime.now(timezone.utc)]
    server = ChatServer(
        enforcing(functools.partial(respond, engine, guard), {"voice": entry}, "serve", clock=lambda: clock[0]),
        base_name=engine.base.name, adapters=["voice"], token="t" * 32,
    )
    server.start()
    try:
        api = openai.OpenAI(base_url=server.url, api_key="t" * 32, max_retries=0, timeout=120)
        ok = api.chat.completions.create(model="voice", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
        assert ok.choices[0].finish_reason in ("stop", "length")
        clock[0] = expires  # the session outlives the licence
        with pytest.raises(openai.PermissionDeniedError, match="expired"):
            api.chat.completions.create(model="voice", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
        base_answer = api.chat.completions.create(
            model=engine.base.name, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
        assert base_answer.choices[0].finish_reason in ("stop", "length")  # only the licensed adapter stops
    finally:
        server.stop(drain_timeout=10)
