#!/usr/bin/env python3
"""Adapter-audit time for a rank-16 LoRA on all seven modules of every layer of the embedded base.

Everything runs on a fresh vault sealed to a private gnome-keyring started here (the audit's MAC key lives
in it), with the adapter opened from the vault as `vault audit` does. Measured side by side in one run:

    first     the very first audit on this machine: shipped directions, base projections dequantized from
              the GGUF and written to the MACed per-base cache (once per base digest, ever)
    cold      a new adapter, nothing about it cached; the base's directions and projections come from the
              MACed cache on disk (in a fresh process: the in-memory memo is cleared)
    cached    the same adapter again: a MAC-verified cache hit (MAC key already read by this process; also
              shown with the one Secret Service lookup a new process pays)
    dense     baseline: the same static measurement done the obvious way, materialising ΔW = s·B·A and
              multiplying by each direction (no verdict, no cache)
    sha256    baseline: hashing the adapter's tensors once (what any content-keyed cache must at least pay
              if it is not handed the digest)
    behaviour (with --behaviour) the llama.cpp behavioural check: base side and adapter side

Targets (issue 4): cold <= 2 s, cached <= 20 ms.

    python bench/guard_audit.py [--runs 7] [--threads 1] [--behaviour] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


_PROFILE_CALL: list = [None]


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _rank16_all_modules(base_model, seed: int):
    import numpy as np

    import abliteration as ab

    base = ab.load_base(base_model)
    return ab.random_lora(base, ab.ALL_MODULES, 16, 0.1, np.random.default_rng(seed))


def _dense(tensors, cfg, directions, projections) -> float:
    """Baseline: materialise every o/down ΔW and take rⱼᵀΔW against the same cached rⱼᵀW."""
    import numpy as np

    from runtime.guard.audit import _prepare, lora_scale
    from vault.adapter_names import parse_peft_name

    prepared = _prepare(directions, projections)
    start = time.perf_counter()
    q = prepared.span
    best = 0.0
    for name, a in tensors.items():
        parsed = parse_peft_name(name)
        if parsed is None or parsed[2] != "A" or parsed[1] not in ("self_attn.o_proj", "mlp.down_proj"):
            continue
        layer, module, _ = parsed
        b = tensors[name.replace("lora_A", "lora_B")]
        delta = lora_scale(cfg, a.shape[0]) * (b @ a)                     # (out, in) dense
        dirs = (q @ prepared.coords.T).T                                  # (m, out)
        kind = "o" if module == "self_attn.o_proj" else "d"
        dots = np.einsum("mi,mi->m", dirs @ delta, prepared.rows[kind][layer])
        best = max(best, float(np.max(-dots / prepared.sq[kind][layer])))
    _ = best
    return time.perf_counter() - start


def _run(args: argparse.Namespace) -> dict:
    import hashlib

    import numpy as np

    from runtime.guard import audit as audit_mod
    from runtime.guard import directions as directions_mod
    from runtime.guard.directions import base_projections, load_directions
    from runtime.models import default_model
    from vault.adapter import load_blob, make_blob
    from vault.store import Vault

    base = default_model()
    vault, _ = Vault.create()
    names = []
    for i in range(args.runs + 1):
        tensors, cfg = _rank16_all_modules(base, seed=i)
        vault.add_blob(f"r16-{i}", make_blob(tensors, cfg, base_name=base.name, base_sha256=base.sha256))
        names.append(f"r16-{i}")
    opened = {n: load_blob(vault.open(n)) for n in names}

    def audit(name: str):
        t, meta = opened[name]
        return audit_mod.audit_adapter(t, meta, base, vault=vault, name=name)

    _PROFILE_CALL[0] = lambda: [audit(names[1]) for _ in range(20)]

    start = time.perf_counter()
    first = audit(names[0])
    first_s = time.perf_counter() - start

    cold, cached, cached_new, dense, digest = [], [], [], [], []
    directions = load_directions(base)
    cache_dir = Path(os.environ["VAULT_HOME"]) / "guard"
    key = bytes.fromhex(vault.keys.get(audit_mod.MAC_KEY_NAME))
    projections = base_projections(base, directions, cache_dir=cache_dir, mac_key=key)
    for name in names[1:]:
        audit_mod._PREPARED.clear()          # as in a fresh process: base data come from the disk cache
        directions_mod._PROJECTIONS.clear()
        start = time.perf_counter()
        report = audit(name)
        cold.append(time.perf_counter() - start)
        assert not report.cached and report.verdict == "pass", report
        start = time.perf_counter()
        report = audit(name)
        cached.append(time.perf_counter() - start)
        assert report.cached
        audit_mod._MAC_KEYS.clear()         # as in a new process: one keyring lookup for the MAC key
        start = time.perf_counter()
        report = audit(name)
        cached_new.append(time.perf_counter() - start)
        assert report.cached
        t, meta = opened[name]
        dense.append(_dense(t, meta.peft_config, directions, projections))
        start = time.perf_counter()
        h = hashlib.sha256()
        for k in sorted(t):
            h.update(np.ascontiguousarray(t[k]).tobytes())
        digest.append(time.perf_counter() - start)
    t, meta = opened[names[1]]
    audit_mod._PREPARED.clear()
    static_only = []
    prepared_dirs = load_directions(base)
    for _ in range(args.runs):
        start = time.perf_counter()
        audit_mod.static_check(t, meta.peft_config, prepared_dirs, projections)
        static_only.append(time.perf_counter() - start)

    result = {
        "adapter": "rank 16, q/k/v/o/gate/up/down in all 30 layers",
        "adapter_bytes": int(sum(a.nbytes for a in t.values())),
        "runs": args.runs,
        "first_audit_ms": round(first_s * 1000, 1),
        "cold_ms": round(_median_ms(cold), 1),
        "cached_ms": round(_median_ms(cached), 2),
        "cached_new_process_ms": round(_median_ms(cached_new), 2),
        "static_check_ms": round(_median_ms(static_only), 1),
        "dense_baseline_ms": round(_median_ms(dense), 1),
        "sha256_baseline_ms": round(_median_ms(digest), 2),
        "ratio_dense_over_static": round(_median_ms(dense) / _median_ms(static_only), 2),
        "ratio_sha256_over_cached": round(_median_ms(digest) / _median_ms(cached), 2),
        "targets": {"cold_ms": 2000, "cached_ms": 20},
        "first_verdict": first.verdict,
    }
    if args.behaviour:
        from runtime.engine import Engine

        with Engine(base, n_threads=args.threads) as engine:
            start = time.perf_counter()
            b1 = audit_mod.behavioural_check(engine, t, meta.peft_config, base_cache=(cache := {}))
            first_b = time.perf_counter() - start
            start = time.perf_counter()
            audit_mod.behavioural_check(engine, t, meta.peft_config, base_cache=cache)
            result["behaviour_first_s"] = round(first_b, 2)
            result["behaviour_base_cached_s"] = round(time.perf_counter() - start, 2)
            result["behaviour"] = b1
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="BLAS/llama.cpp threads (default 1)")
    parser.add_argument("--behaviour", action="store_true", help="also time the llama.cpp behavioural check")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile-cached", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy is imported

    from secret_service import missing_reason, private_vault_env

    reason = missing_reason()
    if reason:
        print(f"bench: cannot start a private keyring: {reason}", file=sys.stderr)
        return 2
    with private_vault_env("vault-audit-bench-"):
        result = _run(args)
        if args.profile_cached:
            import cProfile
            import pstats

            cProfile.runctx("_PROFILE()", globals(), {"_PROFILE": _PROFILE_CALL[0]}, "/tmp/audit-cached.prof")
            pstats.Stats("/tmp/audit-cached.prof").sort_stats("cumtime").print_stats(18)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"adapter audit, {result['adapter']} ({result['adapter_bytes'] / 2**20:.1f} MiB), median of {args.runs}")
    print(f"  first audit on this machine (projections from GGUF): {result['first_audit_ms']:8.1f} ms")
    print(f"  cold  (base directions cached, verdict not):          {result['cold_ms']:8.1f} ms   target <= 2000 ms")
    print(f"  cached (MAC-verified hit):                            {result['cached_ms']:8.2f} ms   target <= 20 ms")
    print(f"  cached, first audit in a new process (+1 keyring read): {result['cached_new_process_ms']:6.2f} ms")
    print(f"  static check alone (low-rank):                        {result['static_check_ms']:8.1f} ms")
    print(f"  baseline dense ΔW = s·B·A:                            {result['dense_baseline_ms']:8.1f} ms"
          f"   ratio dense/low-rank = {result['ratio_dense_over_static']:.1f}x")
    print(f"  baseline sha256 of the tensors:                       {result['sha256_baseline_ms']:8.2f} ms"
          f"   ratio sha256/cached = {result['ratio_sha256_over_cached']:.2f}x")
    if "behaviour" in result:
        b = result["behaviour"]
        print(f"  behavioural check: first {result['behaviour_first_s']:.2f} s, base side cached "
              f"{result['behaviour_base_cached_s']:.2f} s ({b['status']}; base refusals {b['base_refusals']}/{b['n']}, "
              f"KL mean {b['kl_mean']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
