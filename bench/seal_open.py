#!/usr/bin/env python3
"""Seal and open a large age file: vault.age against the age CLI (Go) and pyrage (Rust).

Everything is measured side by side in one run, alternating tools run by run, and the
medians are compared. "open" is the vault path: decrypt a sealed file into memory.

    open  ours   vault.age.decrypt_file(path)           -> a new bytearray (the store's path)
          ours*  vault.age.decrypt_file(path, out=buf)  -> into a reused buffer (e.g. a memfd)
          age    age -d -i KEY -o /dev/null FILE        (the issue's baseline)
          pyrage pyrage.decrypt(file bytes)             (reference)
    seal  ours   vault.age.encrypt_to_file(f, payload)  -> a file in the page cache
          age    age -e -r RECIPIENT -o FILE PLAINFILE
          pyrage pyrage.encrypt(payload)                (reference, in memory)

Ratios are baseline time / our time, so > 1 means we are faster.

    python bench/seal_open.py [--size-mib 256] [--runs 7] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vault import age  # noqa: E402


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def _bench(cases: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Run every case once per round, alternating, and return all timings per case."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pattern", action="store_true", help="a repeating pattern instead of random bytes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    age_cli = shutil.which("age")
    if age_cli is None:
        print("the age CLI is required (Debian package 'age')", file=sys.stderr)
        return 2
    try:
        import pyrage
    except ImportError:
        pyrage = None

    size = args.size_mib << 20
    payload = (bytes(range(256)) * (size // 256)) if args.pattern else os.urandom(size)
    digest = hashlib.sha256(payload).hexdigest()
    ident = age.X25519Identity.generate()
    recipient = ident.recipient

    with tempfile.TemporaryDirectory(prefix="vault-bench-") as tmp:
        d = Path(tmp)
        key = d / "key.txt"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# public key: {recipient.to_string()}\n{ident.to_string()}\n")
        plain = d / "plain"
        plain.write_bytes(payload)
        sealed = d / "sealed.age"
        sealed_cli = d / "sealed-cli.age"

        def seal_ours() -> None:
            with open(sealed, "wb") as f:
                age.encrypt_to_file(f, payload, [recipient])

        def seal_age() -> None:
            subprocess.run([age_cli, "-e", "-r", recipient.to_string(), "-o", str(sealed_cli), str(plain)], check=True)

        seal_cases: dict[str, Callable[[], object]] = {"ours": seal_ours, "age": seal_age}
        if pyrage is not None:
            their_recipient = pyrage.x25519.Recipient.from_str(recipient.to_string())
            seal_cases["pyrage"] = lambda: pyrage.encrypt(payload, [their_recipient])
        seal_runs = _bench(seal_cases, args.runs)
        seal = {name: statistics.median(t) for name, t in seal_runs.items()}

        # Both files must be the real thing before we time opening them.
        opened = age.decrypt_file(sealed, [ident])
        assert hashlib.sha256(opened).hexdigest() == digest
        assert hashlib.sha256(age.decrypt_file(sealed_cli, [ident])).hexdigest() == digest
        reused = opened  # a buffer that is already faulted in, as a caller-held memfd map would be
        sealed.read_bytes()  # page cache warm for every tool

        def open_age() -> None:
            subprocess.run([age_cli, "-d", "-i", str(key), "-o", os.devnull, str(sealed)], check=True)

        open_cases: dict[str, Callable[[], object]] = {
            "ours": lambda: age.decrypt_file(sealed, [ident]),
            "ours_into_buffer": lambda: age.decrypt_file(sealed, [ident], out=reused),
            "age": open_age,
        }
        if pyrage is not None:
            their_identity = pyrage.x25519.Identity.from_str(ident.to_string())
            open_cases["pyrage"] = lambda: pyrage.decrypt(sealed.read_bytes(), [their_identity])
        open_runs = _bench(open_cases, args.runs)
        opening = {name: statistics.median(t) for name, t in open_runs.items()}
        assert hashlib.sha256(reused).hexdigest() == digest

    mib = size / (1 << 20)
    report = {
        "size_mib": args.size_mib,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "open_s": {k: round(v, 4) for k, v in opening.items()},
        "open_runs_s": {k: [round(x, 4) for x in v] for k, v in open_runs.items()},
        "seal_s": {k: round(v, 4) for k, v in seal.items()},
        "seal_runs_s": {k: [round(x, 4) for x in v] for k, v in seal_runs.items()},
        "seal_mib_per_s": {k: round(mib / v, 1) for k, v in seal.items()},
        "open_ratio_age_over_ours": round(opening["age"] / opening["ours"], 2),
        "open_ratio_age_over_ours_into_buffer": round(opening["age"] / opening["ours_into_buffer"], 2),
        "seal_ratio_age_over_ours": round(seal["age"] / seal["ours"], 2),
    }
    if pyrage is not None:
        report["open_ratio_pyrage_over_ours"] = round(opening["pyrage"] / opening["ours"], 2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.size_mib} MiB payload, median of {args.runs} alternating runs, "
          f"{report['cpus']} CPUs, load average {report['loadavg_1m']}")
    print("open (into memory)        median       min       max")
    for name, t in opening.items():
        print(f"  {name:22s} {t:8.3f}  {min(open_runs[name]):8.3f}  {max(open_runs[name]):8.3f}")
    print("seal                      median       min       max     MiB/s")
    for name, t in seal.items():
        print(f"  {name:22s} {t:8.3f}  {min(seal_runs[name]):8.3f}  {max(seal_runs[name]):8.3f}  {mib / t:8.1f}")
    print(f"open ratio age/ours:               {report['open_ratio_age_over_ours']:.2f}x")
    print(f"open ratio age/ours (into buffer): {report['open_ratio_age_over_ours_into_buffer']:.2f}x")
    if pyrage is not None:
        print(f"open ratio pyrage/ours:            {report['open_ratio_pyrage_over_ours']:.2f}x")
    print(f"seal ratio age/ours:               {report['seal_ratio_age_over_ours']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
