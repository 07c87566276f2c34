"""Per-licensee fingerprints (vault/fingerprint.py) and `vault trace`.

alice exports the same adapter to bob and to carol (real vaults, real keyring, real bundles); bob
imports his and leaks it as a PEFT directory; alice's trace names bob's licence and not carol's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from fixtures_adapters import BASE_NAME, lora_tensors
from vault.adapter import load_blob, make_blob
from vault.fingerprint import MATCH_Z, STRENGTH, embed, score, trace

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
          "base_model_name_or_path": BASE_NAME}
KEY = bytes(range(32))
A, B = "a" * 32, "b" * 32


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embed_is_tiny_and_scores_separate(dtype):
    blob = make_blob(lora_tensors(r=8, targets=["q_proj", "v_proj"], dtype=dtype), CONFIG,
                     base_name=BASE_NAME, base_sha256="")
    original, meta = load_blob(blob)
    marked_a, meta_a = load_blob(embed(blob, KEY, A))
    marked_b, _ = load_blob(embed(blob, KEY, B))
    assert meta_a.peft_config == meta.peft_config and meta_a.base_name == meta.base_name
    for name, value in original.items():
        if ".lora_A." in name:
            assert np.array_equal(marked_a[name], value)  # only lora_B is touched
        else:
            rel = np.sqrt(np.mean((marked_a[name].astype(np.float64) - value) ** 2) / np.mean(value.astype(np.float64) ** 2))
            assert rel < 2 * STRENGTH
    assert score(marked_a, original, KEY, A) > 20 * MATCH_Z  # strong for the true licence (~430 here)
    assert abs(score(marked_a, original, KEY, B)) < 5  # ~N(0, 1) for another licence
    assert abs(score(marked_a, original, bytes(32), A)) < 5  # and without the licensor's key
    assert score(original, original, KEY, A) == 0.0
    averaged = {n: (marked_a[n].astype(np.float64) + marked_b[n]) / 2 for n in original}
    assert score(averaged, original, KEY, A) > MATCH_Z and score(averaged, original, KEY, B) > MATCH_Z
    rng = np.random.default_rng(0)
    noisy = {n: v + rng.standard_normal(v.shape) * 2 * STRENGTH * np.sqrt(np.mean(v.astype(np.float64) ** 2))
             if ".lora_B." in n else v for n, v in marked_a.items()}
    assert score(noisy, original, KEY, A) > MATCH_Z  # noise twice the fingerprint's size does not hide it


def _leak(blob: bytearray, directory: Path) -> Path:
    """What a licensee who dumps the decrypted weights would publish: a PEFT directory."""
    tensors, meta = load_blob(blob)
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(meta.peft_config))
    safetensors.numpy.save_file({k: np.array(v) for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    return directory


def test_trace_names_the_leaking_licensee(keyring_env, tmp_path):
    from vault.bundle import export_bundle, import_bundle
    from vault.identity import load_identity
    from vault.store import Vault
    from vault.trust import TrustStore

    alice, _ = Vault.create(tmp_path / "alice")
    bob, _ = Vault.create(tmp_path / "bob")
    carol, _ = Vault.create(tmp_path / "carol")
    blob = make_blob(lora_tensors(r=8, targets=["q_proj", "v_proj"]), CONFIG, base_name=BASE_NAME, base_sha256="")
    alice.add_blob("voice", blob)
    a_id = load_identity(alice.keys, create=True)
    ids = {}
    for name, v in (("bob", bob), ("carol", carol)):
        ident = load_identity(v.keys, create=True)
        TrustStore(v.home, v.keys).add("alice", a_id.public)
        _, ids[name] = export_bundle(alice, "voice", tmp_path / f"to-{name}", to=ident.public.recipient)
        import_bundle(v, tmp_path / f"to-{name}")
    assert ids["bob"].adapter_sha256 != ids["carol"].adapter_sha256  # two licensees, two different copies
    _, unmarked = export_bundle(alice, "voice", tmp_path / "plain", to=load_identity(bob.keys).public.recipient,
                                fingerprint=False)
    assert unmarked.adapter_sha256 == alice.get("voice").sha256

    leaked = _leak(bob.open("voice"), tmp_path / "leaked")
    results = trace(alice, "voice", leaked)
    assert [t.licence_id for t in results][0] == ids["bob"].id
    assert results[0].match and results[0].licensee == ids["bob"].licensee_recipient
    assert [t.licence_id for t in results if t.match] == [ids["bob"].id]
    assert len(results) == 2  # the unfingerprinted export left no record

    clean = _leak(bytearray(blob), tmp_path / "clean")
    assert not any(t.match for t in trace(alice, "voice", clean))

    # the CLI, as a subprocess against alice's vault on the same private keyring
    env = {**os.environ, **keyring_env, "VAULT_HOME": str(alice.home)}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "trace", "voice", str(leaked), "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert rows[0]["licence_id"] == ids["bob"].id and rows[0]["match"] is True and rows[1]["match"] is False
