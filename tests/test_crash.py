"""Kill -9 during `vault add` and `vault rotate`: the vault must still open and no adapter may be lost.

Two ways: deterministic kills at every named step (``VAULT_TEST_CRASH_AT``, honoured by
vault.fsio.crash_point inside the real `vault` process), and kills at random moments.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_adapters import make_peft_adapter
from vault import age
from vault.errors import NoIdentityError
from vault.keys import DEVICE_IDENTITY, DEVICE_IDENTITY_NEXT
from vault.store import Vault

REPO = Path(__file__).resolve().parent.parent
SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
pytestmark = pytest.mark.slow

ADD_POINTS = [
    "fsio:before-rename#1",  # the new object's temporary file is written, not yet renamed
    "fsio:after-rename#1",  # the object is in place, the index does not name it yet
    "add:object-written",
    "fsio:before-rename#2",  # the new index's temporary file is written
    "fsio:after-rename#2",  # the new index is in place, its directory not yet fsynced
    "add:index-written",
]
# a vault with 3 sealed objects: rotate writes 3 objects, then index, then config
ROTATE_POINTS = [
    "rotate:next-key-stored",
    "rotate:rewrapped#1",
    "fsio:before-rename#2",
    "rotate:rewrapped#2",
    "rotate:rewrapped#3",
    "fsio:before-rename#4",  # the new index's temporary file
    "fsio:after-rename#4",
    "rotate:index-written",
    "rotate:config-written",
    "rotate:device-key-replaced",
]


def _spawn(*args: str, crash_at: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("VAULT_TEST_CRASH_AT", None)
    if crash_at:
        env["VAULT_TEST_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _digests(v: Vault) -> dict[str, str]:
    """name -> sha256 of the decrypted plaintext (opens every sealed file for real)."""
    out = {}
    for entry in v.entries():
        blob = v.open(entry.name)
        out[entry.name] = hashlib.sha256(blob).hexdigest()
    return out


@pytest.fixture
def populated(keyring_env, tmp_path: Path) -> tuple[dict[str, str], str, Path]:
    v, recovery = Vault.create()
    for i, name in enumerate(("alpha", "beta")):
        v.add(name, make_peft_adapter(tmp_path / name, layers=range(2), seed=i), base_sha256=SHA)
    v.seal_record("transcript", "t1", b"a private conversation")
    new_adapter = make_peft_adapter(tmp_path / "gamma", layers=range(2), seed=7)
    return _digests(v), recovery, new_adapter


def _assert_intact(before: dict[str, str], *, may_have: dict[str, str] | None = None) -> Vault:
    v = Vault()
    after = _digests(v)
    for name, digest in before.items():
        assert after.get(name) == digest, f"lost or changed {name}"
    extra = set(after) - set(before)
    assert extra <= set(may_have or {}), extra
    assert bytes(v.open_record("transcript", "t1")) == b"a private conversation"
    return v


@pytest.mark.parametrize("point", ADD_POINTS)
def test_kill_during_add(populated, point: str) -> None:
    before, _, new_adapter = populated
    proc = _spawn("add", "gamma", str(new_adapter), crash_at=point)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    v = _assert_intact(before, may_have={"gamma": ""})
    v.doctor(fix=True)  # removes the orphan / temporary file an interrupted add may leave
    assert all(c.status == "ok" for c in Vault().doctor()), Vault().doctor()
    if "gamma" not in {e.name for e in v.entries()}:
        Vault().add("gamma", new_adapter, base_sha256=SHA)  # and the add can simply be retried
    assert "gamma" in _digests(Vault())


@pytest.mark.parametrize("point", ROTATE_POINTS)
def test_kill_during_rotate(populated, point: str) -> None:
    before, recovery, _ = populated
    old_key = Vault().keys.get(DEVICE_IDENTITY)
    proc = _spawn("rotate", crash_at=point)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    _assert_intact(before)  # openable right after the kill, with whatever keys the keyring holds
    Vault().rotate()  # resumes (or redoes) the interrupted rotation
    v = _assert_intact(before)
    assert v.keys.get(DEVICE_IDENTITY_NEXT) is None and v.keys.get(DEVICE_IDENTITY) != old_key
    old = age.X25519Identity.from_string(old_key)
    for entry in v.entries():
        with pytest.raises(NoIdentityError):
            age.decrypt_file(v.object_path(entry.name), [old])
        age.decrypt_file(v.object_path(entry.name), [age.X25519Identity.from_string(recovery)])
    v.doctor(fix=True)
    assert all(c.status == "ok" for c in Vault().doctor())


def test_kill_at_random_moments(populated) -> None:
    """Kills at random delays during add and rotate; seeded, so a failure can be replayed."""
    before, _, new_adapter = populated
    rng = random.Random(20261125)
    for round_ in range(8):
        args = ("rotate",) if round_ % 2 else ("add", "gamma", str(new_adapter), "--force")
        proc = _spawn(*args)
        time.sleep(rng.uniform(0.3, 2.0))  # interpreter start-up is ~0.8 s: kills land before, during, after
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
        _assert_intact(before, may_have={"gamma": ""})  # gamma, if present, opens and matches its digest
    Vault().rotate()
    Vault().doctor(fix=True)
    assert all(c.status == "ok" for c in Vault().doctor())
    _assert_intact(before, may_have={"gamma": ""})
