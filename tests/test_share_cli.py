"""End to end through the `vault` CLI: alice, bob and carol, each with their own home and their own
REAL gnome-keyring (make_user), running `python -m cli.main` as separate processes.

alice exports to bob; bob verifies and imports (and the licence shows up in list/show); carol can
neither verify as licensee nor import; tampered bundles and forbidden re-exports are refused with
the right exit code and nothing is stored; the upstream model_signing CLI verifies alice's bundle.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_adapters import make_peft_adapter
from vault.errors import BundleError, LicenceError, SignatureError

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def vault(user, *args: str, ok: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *map(str, args)],
        cwd=REPO, env=user.env, capture_output=True, text=True, timeout=300, input=input,
    )
    if ok:
        assert proc.returncode == 0, f"vault {' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr}"
    return proc


def _people(make_user, tmp_path, names=("alice", "bob", "carol")) -> dict:
    """Users with a vault and an exported identity each; alice holds adapter 'voice'; the others trust alice."""
    people = {name: make_user(name) for name in names}
    for name, user in people.items():
        vault(user, "init")
        vault(user, "identity", "export", "-o", tmp_path / f"{name}.id")
    adapter = make_peft_adapter(tmp_path / "alice-adapter", r=4, targets=["q_proj", "v_proj"], layers=range(6), seed=7)
    vault(people["alice"], "add", "voice", adapter)
    for name in names[1:]:
        vault(people[name], "trust", "add", "alice", tmp_path / "alice.id")
    (tmp_path / "terms.txt").write_text("Personal use by Bob only.\nNo resale.\n")
    return people


@pytest.fixture
def trio(make_user, tmp_path):
    return _people(make_user, tmp_path)


def _export(alice, tmp_path, out="bundle", *extra: str) -> Path:
    vault(alice, "export", "voice", "--to", tmp_path / "bob.id", "--licence", tmp_path / "terms.txt",
          "--expires", "30d", "-o", tmp_path / out, *extra)
    return tmp_path / out


def test_alice_to_bob_and_not_carol(trio, tmp_path):
    alice, bob, carol = trio["alice"], trio["bob"], trio["carol"]
    ident = json.loads(vault(alice, "identity", "--json").stdout)
    assert ident["recipient"].startswith("age1") and "BEGIN PUBLIC KEY" in ident["signing_key"]
    trusted = json.loads(vault(bob, "trust", "list", "--json").stdout)
    assert [(t["name"], t["key_id"]) for t in trusted] == [("alice", ident["key_id"])]

    bundle = _export(alice, tmp_path, "bundle", "--allow", "serve")
    assert sorted(p.name for p in bundle.iterdir()) == ["README.txt", "adapter.age", "licence.json", "model.sig"]

    # bob verifies (nothing decrypted) and imports
    report = json.loads(vault(bob, "verify", bundle, "--json").stdout)
    assert report["valid"] and report["signer"]["name"] == "alice"
    assert report["licence"]["uses"] == ["chat", "serve"] and report["licence"]["guard_required"] is True
    human = vault(bob, "verify", bundle).stdout
    assert "bundle OK" in human and "Personal use by Bob only." in human
    vault(bob, "import", bundle)
    [entry] = json.loads(vault(bob, "list", "--json").stdout)
    assert entry["name"] == "voice" and entry["source"] == "import"
    assert entry["licence"]["licensee"]["recipient"] == json.loads(vault(bob, "identity", "--json").stdout)["recipient"]
    alice_entry = json.loads(vault(alice, "show", "voice", "--json").stdout)
    assert entry["sha256"] == report["licence"]["adapter"]["sha256"]  # what the signed licence names
    assert entry["sha256"] != alice_entry["sha256"]  # bob's copy carries his fingerprint

    # bob may not re-share (no 'share' in the licence): refused with the licence exit code
    denied = vault(bob, "export", "voice", "--to", tmp_path / "carol.id", "--licence", tmp_path / "terms.txt",
                   "-o", tmp_path / "reshare", ok=False)
    assert denied.returncode == LicenceError.exit_code and "does not permit 'share'" in denied.stderr
    assert not (tmp_path / "reshare").exists()

    # a second import under the same name is refused; under a new name it works
    again = vault(bob, "import", bundle, ok=False)
    assert again.returncode != 0 and "already exists" in again.stderr

    # carol trusts alice, but the bundle is not addressed to her: verify and import both refuse
    for cmd in (("verify", bundle), ("import", bundle)):
        refused = vault(carol, *cmd, ok=False)
        assert refused.returncode == LicenceError.exit_code, refused.stderr
        assert "not to you" in refused.stderr
    assert json.loads(vault(carol, "list", "--json").stdout) == []


def test_tampered_bundles_are_refused_and_nothing_imported(make_user, tmp_path):
    people = _people(make_user, tmp_path, ("alice", "bob"))
    bob = people["bob"]
    bundle = _export(people["alice"], tmp_path)
    for tamper in ("flip-adapter", "flip-licence", "flip-readme", "remove-readme", "add-file", "rename-sig"):
        copy = tmp_path / f"tampered-{tamper}"
        shutil.copytree(bundle, copy)
        if tamper.startswith("flip"):
            target = copy / {"adapter": "adapter.age", "licence": "licence.json", "readme": "README.txt"}[tamper[5:]]
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0x20
            target.write_bytes(data)
        elif tamper == "remove-readme":
            (copy / "README.txt").unlink()
        elif tamper == "add-file":
            (copy / "notes.txt").write_text("hi")
        else:
            (copy / "model.sig").rename(copy / "model.sig.bak")
        proc = vault(bob, "import", copy, ok=False)
        assert proc.returncode in (BundleError.exit_code, SignatureError.exit_code), (tamper, proc.stderr)
        assert proc.stderr.startswith("vault: error: ") and "Traceback" not in proc.stderr
    assert json.loads(vault(bob, "list", "--json").stdout) == []
    vault(bob, "import", bundle)  # the untouched original still imports: the refusals were the tampering


def test_untrusted_signer_explicit_signer_and_trust_file(make_user, tmp_path):
    people = _people(make_user, tmp_path, ("alice", "bob"))
    bob = people["bob"]
    bundle = _export(people["alice"], tmp_path)
    pub = tmp_path / "alice.pub"
    pub.write_text(json.loads(vault(people["alice"], "identity", "--json").stdout)["signing_key"])
    upstream = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
         "--public_key", str(pub)], capture_output=True, text=True, timeout=120,
    )
    assert upstream.returncode == 0 and "Verification succeeded" in upstream.stdout, upstream.stderr
    vault(bob, "trust", "remove", "alice")
    refused = vault(bob, "import", bundle, ok=False)
    assert refused.returncode == SignatureError.exit_code and "do not trust" in refused.stderr
    # --signer FILE verifies against that key without trusting it (import still requires trust)
    vault(bob, "verify", bundle, "--signer", tmp_path / "alice.id")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "other.pub").write_bytes(
        other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    wrong = vault(bob, "verify", bundle, "--signer", tmp_path / "other.pub", ok=False)
    assert wrong.returncode == SignatureError.exit_code
    assert json.loads(vault(bob, "list", "--json").stdout) == []
    # an edit of trust.json outside vault (re-adding alice as "mallory") is refused: exit 7 (integrity)
    vault(bob, "trust", "add", "alice", tmp_path / "alice.id")
    trust = bob.home / "trust.json"
    doc = json.loads(trust.read_text())
    doc["signers"][0]["name"] = "mallory"
    trust.write_text(json.dumps(doc))
    proc = vault(bob, "trust", "list", ok=False)
    assert proc.returncode == 7 and "changed outside vault" in proc.stderr


def test_reexport_allowed_by_share_is_clamped(trio, tmp_path):
    alice, bob, carol = trio["alice"], trio["bob"], trio["carol"]
    template = tmp_path / "licence.json"  # --licence may also be a JSON template instead of plain terms
    template.write_text(json.dumps({"terms": "Bob may pass it on.", "uses": ["share"], "expires": "30d"}))
    bundle = tmp_path / "bundle"
    vault(alice, "export", "voice", "--to", tmp_path / "bob.id", "--licence", template, "-o", bundle)
    assert json.loads((bundle / "licence.json").read_text())["uses"] == ["chat", "share"]
    vault(bob, "import", bundle)
    vault(carol, "trust", "add", "bob", tmp_path / "bob.id")
    # bob asks for more than he was granted: refused
    over = vault(bob, "export", "voice", "--to", tmp_path / "carol.id", "--licence", tmp_path / "terms.txt",
                 "--allow", "merge", "-o", tmp_path / "b2", ok=False)
    assert over.returncode == LicenceError.exit_code and "does not let you grant 'merge'" in over.stderr
    vault(bob, "export", "voice", "--to", tmp_path / "carol.id", "--licence", tmp_path / "terms.txt",
          "--expires", "never", "--guard-optional", "-o", tmp_path / "b2")
    report = json.loads(vault(carol, "verify", tmp_path / "b2", "--json").stdout)
    parent = json.loads((bundle / "licence.json").read_text())
    assert report["licence"]["expires"] == parent["expires"]  # "never" clamped to the parent's expiry
    assert report["licence"]["guard_required"] is True  # cannot be relaxed
    assert report["licence"]["parent"] == parent["id"]
    vault(carol, "import", tmp_path / "b2")

    # malformed inputs: one-line errors with the right exit code, never a traceback
    (tmp_path / "junk").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps({"uses": "serve"}))
    for args in (
        ("verify", tmp_path / "junk"),
        ("verify", tmp_path / "missing"),
        ("trust", "add", "x", "not-a-file"),
        ("export", "voice", "--to", "age1nope", "--licence", tmp_path / "terms.txt", "-o", tmp_path / "o"),
        ("export", "voice", "--to", tmp_path / "bob.id", "--licence", tmp_path / "terms.txt", "--expires", "2001-01-01",
         "-o", tmp_path / "o"),
        ("export", "voice", "--to", tmp_path / "bob.id", "--licence", tmp_path / "terms.txt", "--allow", "fly",
         "-o", tmp_path / "o"),
        ("export", "voice", "--to", tmp_path / "bob.id", "--licence", tmp_path / "bad.json", "-o", tmp_path / "o"),
    ):
        proc = vault(alice, *args, ok=False)
        assert proc.returncode not in (0, 70), proc.stderr
        assert proc.stderr.startswith("vault: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_bob_runs_the_licensed_adapter_one_shot(make_user, tmp_path):
    """The licence travels into `vault run`: bob's one-shot answer goes through the real engine and guard."""
    people = _people(make_user, tmp_path, ("alice", "bob"))
    bob = people["bob"]
    vault(bob, "import", _export(people["alice"], tmp_path))
    listed = vault(bob, "list").stdout
    assert "chat until" in listed and "guard required" in listed
    shown = vault(bob, "show", "voice").stdout
    assert "Personal use by Bob only." in shown and "licensor key" in shown
    answer = json.loads(vault(bob, "run", "voice", "Say hi.", "--max-tokens", "4", "--temperature", "0", "--json").stdout)
    assert answer["finish_reason"] in ("stop", "length", "content_filter")
