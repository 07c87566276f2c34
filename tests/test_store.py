"""vault.store against a real Secret Service and the real `age` CLI: sealing, no lock-in, tamper, rotate, recover."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from fixtures_adapters import lora_tensors, make_peft_adapter
from vault import age
from vault.adapter import read_adapter
from vault.errors import (
    AlreadyExistsError,
    AlreadyInitializedError,
    DiskFullError,
    IntegrityError,
    LockedError,
    NoIdentityError,
    NotInitializedError,
    UnknownNameError,
    UsageError,
)
from vault.fsio import vault_lock
from vault.keys import DEVICE_IDENTITY, DEVICE_IDENTITY_NEXT, KeyStore
from vault.store import Vault

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture
def vault(keyring_env, isolated_home: Path) -> tuple[Vault, str]:
    return Vault.create()


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    return make_peft_adapter(tmp_path / "adapter", layers=range(4))


def _files(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def test_create_layout_modes_and_no_secret_on_disk(vault, adapter_dir: Path, isolated_home: Path) -> None:
    v, recovery = vault
    v.add("my-voice", adapter_dir, base_sha256=SHA)
    assert stat.S_IMODE(isolated_home.stat().st_mode) == 0o700
    assert stat.S_IMODE((isolated_home / "objects").stat().st_mode) == 0o700
    for path in _files(isolated_home):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        content = path.read_bytes()
        assert b"AGE-SECRET-KEY" not in content and recovery.encode() not in content
        assert b"my-voice" not in content and b"SmolLM2" not in content  # the index is sealed too
    config = json.loads((isolated_home / "config.json").read_text())
    assert set(config) == {"format", "vault_id", "device_recipient", "recovery_recipient", "created"}
    assert v.keys.get(DEVICE_IDENTITY).startswith("AGE-SECRET-KEY-1")
    with pytest.raises(AlreadyInitializedError):
        Vault.create()


def test_add_list_open_round_trip(vault, adapter_dir: Path) -> None:
    v, _ = vault
    entry = v.add("my-voice", adapter_dir, base_sha256=SHA)
    assert [e.name for e in Vault().entries()] == ["my-voice"]
    assert entry.r == 8 and entry.target_modules == ["q_proj", "v_proj"] and entry.base_sha256 == SHA
    blob = Vault().open("my-voice")
    assert isinstance(blob, bytearray) and len(blob) == entry.size
    loaded = safetensors.numpy.load(bytes(blob))
    for name, array in lora_tensors(layers=range(4)).items():
        np.testing.assert_array_equal(loaded[name], array)
    assert v.open_meta("my-voice").base_sha256 == SHA


def test_names_are_checked(vault, adapter_dir: Path) -> None:
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    with pytest.raises(AlreadyExistsError):
        v.add("a", adapter_dir, base_sha256=SHA)
    old_object = v.get("a").object
    v.add("a", make_peft_adapter(adapter_dir.parent / "b", r=4, layers=range(1)), base_sha256=SHA, force=True)
    assert v.get("a").r == 4 and not (v.home / "objects" / old_object).exists()
    with pytest.raises(UnknownNameError):
        v.open("nope")
    with pytest.raises(UsageError):
        v.add("../escape", adapter_dir, base_sha256=SHA)


def test_age_cli_and_recovery_key_recover_an_adapter_without_vault(vault, adapter_dir: Path, tmp_path: Path) -> None:
    """The no-lock-in promise: stock `age` + safetensors, with the recovery key only."""
    v, recovery = vault
    v.add("my-voice", adapter_dir, base_sha256=SHA)
    key_file = tmp_path / "recovery.key"
    key_file.write_text(recovery + "\n")
    sealed = v.object_path("my-voice")
    out = subprocess.run(["age", "-d", "-i", str(key_file), str(sealed)], capture_output=True, check=True).stdout
    loaded = safetensors.numpy.load(out)
    for name, array in lora_tensors(layers=range(4)).items():
        np.testing.assert_array_equal(loaded[name], array)
    index = subprocess.run(["age", "-d", "-i", str(key_file), str(v.home / "index.age")],
                           capture_output=True, check=True).stdout
    assert json.loads(index)["index"]["entries"]["my-voice"]["sha256"] == v.get("my-voice").sha256


def test_tamper_and_truncation_are_one_integrity_error(vault, adapter_dir: Path) -> None:
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    path = v.object_path("a")
    original = path.read_bytes()
    for damaged in (original[:-1], original[:200], original[:-300] + bytes([original[-300] ^ 1]) + original[-299:]):
        path.write_bytes(damaged)
        with pytest.raises(IntegrityError):
            Vault().open("a")
    path.write_bytes(original)
    index = v.home / "index.age"
    data = bytearray(index.read_bytes())
    data[-20] ^= 0x40
    index.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        Vault().entries()


def test_swapped_object_is_detected_by_the_index_digest(vault, adapter_dir: Path, tmp_path: Path) -> None:
    """age is not signed: anyone with the public recipients can seal a file. The MAC'd index catches it."""
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    other = make_peft_adapter(tmp_path / "evil", layers=range(4), seed=99)
    forged_blob = read_adapter(other, base_sha256=SHA).blob
    recipients = [age.X25519Recipient.from_string(v.config[k]) for k in ("device_recipient", "recovery_recipient")]
    v.object_path("a").write_bytes(age.encrypt(forged_blob, recipients))
    with pytest.raises(IntegrityError, match="not the one the index names"):
        Vault().open("a")


def test_forged_index_is_rejected(vault, adapter_dir: Path) -> None:
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    recipients = [age.X25519Recipient.from_string(v.config[k]) for k in ("device_recipient", "recovery_recipient")]
    body = {"format": "vault-index/1", "vault_id": v.vault_id, "device_recipient": v.config["device_recipient"],
            "recovery_recipient": v.config["recovery_recipient"], "updated": "x", "entries": {}, "records": {}}
    forged = json.dumps({"index": body, "mac": "00" * 32}).encode()
    (v.home / "index.age").write_bytes(age.encrypt(forged, recipients))
    with pytest.raises(IntegrityError, match="failed authentication"):
        Vault().entries()


def test_tampered_config_does_not_redirect_new_files(vault, adapter_dir: Path, isolated_home: Path) -> None:
    """Malware that rewrites config.json with its own recovery recipient gets nothing: the sealed index rules."""
    v, _ = vault
    attacker = age.X25519Identity.generate()
    config = json.loads((isolated_home / "config.json").read_text())
    config["recovery_recipient"] = attacker.recipient.to_string()
    (isolated_home / "config.json").write_text(json.dumps(config))
    fresh = Vault()
    fresh.add("a", adapter_dir, base_sha256=SHA)
    with pytest.raises(NoIdentityError):
        age.decrypt_file(fresh.object_path("a"), [attacker])
    checks = {c.name: c for c in fresh.doctor(fix=True)}
    assert checks["config"].detail.startswith("config.json was stale")
    assert json.loads((isolated_home / "config.json").read_text())["recovery_recipient"] != config["recovery_recipient"]


def test_file_sealed_to_another_device_is_no_identity(make_user, monkeypatch, adapter_dir: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    vaults = {}
    for user in (alice, bob):
        for key, value in user.service.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("VAULT_HOME", str(user.home))
        v, _ = Vault.create(user.home, keys=KeyStore("placeholder", backend=_ss_backend()))
        v.add("a", adapter_dir, base_sha256=SHA)
        vaults[user.name] = v
    # bob's keyring is active: alice's sealed file copied over bob's cannot be unwrapped
    shutil.copyfile(vaults["alice"].object_path("a"), vaults["bob"].object_path("a"))
    with pytest.raises(NoIdentityError):
        Vault(bob.home).open("a")
    # alice's whole vault dir on bob's machine: bob's keyring has no device key for it
    with pytest.raises(NoIdentityError, match="vault recover"):
        Vault(alice.home).entries()


def _ss_backend():
    from keyring.backends import SecretService

    return SecretService.Keyring()


def test_rotate_rewraps_everything_and_retires_the_old_key(vault, adapter_dir: Path, tmp_path: Path) -> None:
    v, recovery = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    v.seal_record("transcript", "t1", b"hello")
    old = age.X25519Identity.from_string(v.keys.get(DEVICE_IDENTITY))
    v.rotate()
    new = v.keys.get(DEVICE_IDENTITY)
    assert new != old.to_string() and v.keys.get(DEVICE_IDENTITY_NEXT) is None
    fresh = Vault()
    assert fresh.config["device_recipient"] == age.X25519Identity.from_string(new).recipient.to_string()
    assert bytes(fresh.open_record("transcript", "t1")) == b"hello"
    assert len(fresh.open("a")) == fresh.get("a").size
    for sealed in (fresh.object_path("a"), fresh.home / "index.age"):
        with pytest.raises(NoIdentityError):
            age.decrypt_file(sealed, [old])
        age.decrypt_file(sealed, [age.X25519Identity.from_string(recovery)])  # recovery still opens all
    assert all(c.status == "ok" for c in fresh.doctor())


def test_recover_on_a_new_machine(keyring_env, make_user, monkeypatch, adapter_dir: Path, tmp_path: Path) -> None:
    v, recovery = Vault.create()
    v.add("a", adapter_dir, base_sha256=SHA)
    v.seal_record("preference", "p1", b'{"chosen": "x"}')
    old = age.X25519Identity.from_string(v.keys.get(DEVICE_IDENTITY))
    backup = tmp_path / "restored"
    shutil.copytree(v.home, backup)
    new_machine = make_user("new-machine")
    for key, value in new_machine.service.env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(NoIdentityError):
        Vault(backup).open("a")
    with pytest.raises(NoIdentityError, match="does not belong"):
        Vault.recover(age.X25519Identity.generate().to_string(), backup)
    with pytest.raises(UsageError):
        Vault.recover("not a key", backup)
    with pytest.raises(NotInitializedError):
        Vault.recover(recovery, tmp_path / "empty")
    recovered = Vault.recover(recovery, backup)
    assert recovered.get("a").sha256 == v.get("a").sha256
    assert len(Vault(backup).open("a")) == v.get("a").size
    assert bytes(Vault(backup).open_record("preference", "p1")) == b'{"chosen": "x"}'
    with pytest.raises(NoIdentityError):
        age.decrypt_file(recovered.object_path("a"), [old])
    assert all(c.status == "ok" for c in Vault(backup).doctor())


def test_records_api(vault) -> None:
    v, _ = vault
    v.seal_record("checkpoint", "step-10", b"\x00" * 1000)
    v.seal_record("checkpoint", "step-10", b"replaced")
    v.seal_record("checkpoint", "step-20", b"")
    assert v.records("checkpoint") == ["step-10", "step-20"] and v.records("transcript") == []
    assert bytes(v.open_record("checkpoint", "step-10")) == b"replaced"
    assert bytes(v.open_record("checkpoint", "step-20")) == b""
    v.remove_record("checkpoint", "step-10")
    assert v.records("checkpoint") == ["step-20"]
    with pytest.raises(UnknownNameError):
        v.open_record("checkpoint", "step-10")
    assert len(list((v.home / "objects").iterdir())) == 1


def test_remove_and_update_entry(vault, adapter_dir: Path) -> None:
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    v.update_entry("a", audit={"verdict": "pass"}, licence={"to": "bob"})
    assert Vault().get("a").audit == {"verdict": "pass"} and Vault().get("a").licence == {"to": "bob"}
    with pytest.raises(ValueError):
        v.update_entry("a", sha256="0" * 64)
    sealed = v.object_path("a")
    v.remove("a")
    assert Vault().entries() == [] and not sealed.exists()
    with pytest.raises(UnknownNameError):
        v.remove("a")


def test_doctor_finds_and_fixes_modes_and_orphans(vault, adapter_dir: Path) -> None:
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    assert all(c.status == "ok" for c in v.doctor())
    os.chmod(v.home / "config.json", 0o644)
    (v.home / "objects" / ("ab" * 16 + ".age")).write_bytes(b"orphan")
    (v.home / ".index.age.0123456789ab.tmp").write_bytes(b"half-written")
    checks = {c.name: c.status for c in v.doctor()}
    assert checks["permissions"] == "fail" and checks["orphans"] == "warn"
    v.doctor(fix=True)
    assert all(c.status == "ok" for c in v.doctor())
    assert sorted(p.name for p in (v.home / "objects").iterdir()) == [v.get("a").object]
    path = v.object_path("a")
    path.write_bytes(path.read_bytes()[:-5])
    assert {c.name: c.status for c in v.doctor()}["objects"] == "fail"


def test_mutations_wait_for_the_lock(vault, adapter_dir: Path) -> None:
    v, _ = vault
    impatient = Vault(lock_timeout=0.2)
    with vault_lock(v.home):
        with pytest.raises(LockedError):
            impatient.add("a", adapter_dir, base_sha256=SHA)
    impatient.add("a", adapter_dir, base_sha256=SHA)


def test_disk_full_leaves_the_vault_unchanged(keyring_env, tmp_path: Path) -> None:
    """A real ENOSPC: the vault on a 512 KiB tmpfs, an adapter of 1.8 MiB."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(mount)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        v, _ = Vault.create(mount / "vault")
        v.add("small", make_peft_adapter(tmp_path / "s", r=1, layers=range(1)), base_sha256=SHA)
        with pytest.raises(DiskFullError):
            v.add("big", make_peft_adapter(tmp_path / "big"), base_sha256=SHA)
        fresh = Vault(mount / "vault")
        assert [e.name for e in fresh.entries()] == ["small"]
        assert not [p for p in (mount / "vault").rglob("*.tmp")]
        assert all(c.status == "ok" for c in fresh.doctor())
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_long_lived_vault_follows_a_rotation_by_another_process(vault, adapter_dir: Path) -> None:
    """`vault serve` keeps a Vault open while `vault rotate` runs elsewhere: it must re-read the keyring."""
    v, _ = vault
    v.add("a", adapter_dir, base_sha256=SHA)
    long_lived = Vault()
    assert len(long_lived.open("a")) == v.get("a").size  # caches the old device key
    Vault().rotate()
    assert len(long_lived.open("a")) == v.get("a").size
    assert [e.name for e in long_lived.entries()] == ["a"]
