#!/usr/bin/env python3
"""Export, verify and import of a ~10 MB adapter bundle, side by side with the stock tools.

Two real vaults (alice, bob) on a private gnome-keyring. Every round runs each case once,
alternating, and medians are compared:

    export  vault   export_bundle(): open sealed adapter, fingerprint, licence, age-encrypt to bob, model-signing sign
            stock   age -r BOB -o adapter.age PLAIN  +  model_signing sign key (the same two steps by hand)
    verify  vault   verify_bundle(): layout, trusted signer, signature, licence, addressee, expiry (no decryption)
            stock   model_signing verify key DIR --signature DIR/model.sig --public_key alice.pub
    import  vault   import_bundle(): private copy, verify, decrypt in memory, digest + base check, seal into bob's vault
            stock   age -d -i BOB -o /dev/null adapter.age  (decryption alone, no checks, nothing stored)

Ratios are stock time / vault time (> 1 means vault is faster). The stock CLIs pay a process
start; the table also shows the in-process cost of model-signing's own verify for reference.

    python bench/share.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures_adapters import BASE_NAME, lora_tensors  # noqa: E402
from secret_service import SecretService  # noqa: E402


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("age") is None:
        print("the age CLI is required (Debian package 'age')", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="vault-share-bench-") as tmp_s:
        tmp = Path(tmp_s)
        service = SecretService(tmp / "keyring").start()
        try:
            os.environ.update(service.env)
            return _run(tmp, args)
        finally:
            service.stop()


def _run(tmp: Path, args: argparse.Namespace) -> int:
    import keyring
    from cryptography.hazmat.primitives import serialization
    from keyring.backends import SecretService as Backend
    from model_signing import hashing, verifying

    from vault import age
    from vault.adapter import make_blob
    from vault.bundle import export_bundle, import_bundle, verify_bundle
    from vault.identity import load_identity
    from vault.store import Vault
    from vault.trust import TrustStore

    keyring.set_keyring(Backend.Keyring())
    alice, _ = Vault.create(tmp / "alice")
    bob, _ = Vault.create(tmp / "bob")
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]}
    blob = make_blob(lora_tensors(r=16, targets=config["target_modules"]), config, base_name=BASE_NAME, base_sha256="a" * 64)
    alice.add_blob("voice", blob)
    a_id = load_identity(alice.keys, create=True)
    b_id = load_identity(bob.keys, create=True)
    TrustStore(bob.home, bob.keys).add("alice", a_id.public)
    plain = tmp / "plain.safetensors"
    plain.write_bytes(blob)
    alice_pem = tmp / "alice.pub"
    alice_pem.write_text(a_id.public.signing_key_pem)
    bob_key = tmp / "bob.key"  # the stock path needs the identity in a file; vault's never does
    fd = os.open(bob_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (b_id.age_identity.to_string() + "\n").encode())
    os.close(fd)
    alice_key = tmp / "alice.key"  # likewise the upstream signer CLI needs the private key in a file
    pem = a_id.signing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    fd = os.open(alice_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, pem)
    os.close(fd)

    times: dict[str, list[float]] = {k: [] for k in ("export", "export_stock", "verify", "verify_stock",
                                                       "verify_lib", "import", "import_stock")}
    bundle = None
    for i in range(args.runs):
        out = tmp / f"bundle-{i}"
        t = time.perf_counter()
        export_bundle(alice, "voice", out, to=b_id.public.recipient, uses=("chat",), terms="bench")
        times["export"].append(time.perf_counter() - t)
        bundle = out

        stock = tmp / f"stock-{i}"
        stock.mkdir()
        t = time.perf_counter()
        subprocess.run(["age", "-r", b_id.public.recipient, "-o", str(stock / "adapter.age"), str(plain)], check=True)
        subprocess.run([sys.executable, "-m", "model_signing", "sign", "key", str(stock), "--signature",
                        str(stock / "model.sig"), "--private_key", str(alice_key)], check=True, capture_output=True)
        times["export_stock"].append(time.perf_counter() - t)

        trusted = TrustStore(bob.home, bob.keys).list()
        t = time.perf_counter()
        verify_bundle(out, my_recipient=b_id.public.recipient, trusted=trusted)
        times["verify"].append(time.perf_counter() - t)

        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(out), "--signature",
                        str(out / "model.sig"), "--public_key", str(alice_pem)], check=True, capture_output=True)
        times["verify_stock"].append(time.perf_counter() - t)

        t = time.perf_counter()
        (verifying.Config().use_elliptic_key_verifier(public_key=alice_pem)
         .set_hashing_config(hashing.Config().set_ignored_paths(paths=["model.sig"])).verify(out, out / "model.sig"))
        times["verify_lib"].append(time.perf_counter() - t)

        t = time.perf_counter()
        import_bundle(bob, out, name="voice")
        times["import"].append(time.perf_counter() - t)
        bob.remove("voice")

        t = time.perf_counter()
        subprocess.run(["age", "-d", "-i", str(bob_key), "-o", "/dev/null", str(out / "adapter.age")], check=True)
        times["import_stock"].append(time.perf_counter() - t)

    assert bundle is not None
    sizes = {p.name: p.stat().st_size for p in sorted(bundle.iterdir())}
    med = {k: _median(v) for k, v in times.items()}
    result = {
        "adapter_plaintext_bytes": len(blob),
        "bundle_bytes": sizes,
        "bundle_total_bytes": sum(sizes.values()),
        "overhead_bytes": sum(sizes.values()) - len(blob),
        "runs": args.runs,
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "ratio_stock_over_vault": {
            "export": round(med["export_stock"] / med["export"], 2),
            "verify": round(med["verify_stock"] / med["verify"], 2),
            "verify_vs_model_signing_in_process": round(med["verify_lib"] / med["verify"], 2),
            "import": round(med["import_stock"] / med["import"], 2),
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"adapter: {len(blob):,} bytes plaintext; bundle: {result['bundle_total_bytes']:,} bytes "
          f"(overhead {result['overhead_bytes']:,} bytes)")
    for name, size in sizes.items():
        print(f"  {name:13s} {size:>12,} bytes")
    print(f"medians over {args.runs} alternating rounds (seconds):")
    rows = [("export", "export_stock", "age CLI + model_signing sign CLI"),
            ("verify", "verify_stock", "model_signing verify CLI"),
            ("verify", "verify_lib", "model_signing verify, in process"),
            ("import", "import_stock", "age -d CLI (decrypt only)")]
    for ours, base, label in rows:
        print(f"  {ours:7s} vault {med[ours]:.4f}   {label}: {med[base]:.4f}   ratio {med[base] / med[ours]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
