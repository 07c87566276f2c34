#!/usr/bin/env python3
"""`vault train` on the shipped ~220 KB public-domain corpus (bench/corpus): time, memory, perplexity.

The whole real path runs: a fresh vault sealed to a private gnome-keyring (started here, on its own
D-Bus), the corpus read into memory, the embedded GGUF loaded into torch, LoRA training with
sealed checkpoints, held-out perplexity, the adapter sealed with Vault.add_blob.

The baseline, measured in the same run on the same held-out blocks, is the base model itself:
the ratio printed is adapter perplexity / base perplexity (lower is better; the issue's target is
<= 0.80, a drop of at least 20%). Wall time and peak RSS are compared with the issue's budgets
(15 minutes, 4 GB) on the 2-core reference machine.

    python bench/train.py [--epochs 1] [--threads N] [--max-minutes M] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CORPUS = ROOT / "bench" / "corpus"
BUDGET_S = 15 * 60
BUDGET_RSS = 4e9
TARGET_PPL_RATIO = 0.80


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from secret_service import missing_reason, private_vault_env

    reason = missing_reason()
    if reason:
        print(f"bench: cannot start a private keyring: {reason}", file=sys.stderr)
        return 2
    with private_vault_env("vault-train-bench-"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from runtime.train import TrainConfig, train
    from vault.store import Vault

    vault, _recovery = Vault.create()
    config = TrainConfig(epochs=args.epochs, threads=args.threads, max_minutes=args.max_minutes)
    last = [0.0]

    def progress(event) -> None:  # noqa: ANN001 - a TrainEvent
        now = time.monotonic()
        if event.phase != "train" or now - last[0] >= 30 or event.step == event.total:
            last[0] = now
            if event.phase == "train":
                print(f"  step {event.step}/{event.total} loss {event.loss:.3f} {event.tokens_per_s:.0f} tok/s "
                      f"ETA {event.eta_s:.0f} s", file=sys.stderr, flush=True)
            else:
                print(f"  {event.phase}: {event.message}", file=sys.stderr, flush=True)

    plays = sorted(p for p in CORPUS.glob("*.md") if p.name != "README.md")
    corpus_bytes = sum(p.stat().st_size for p in plays)
    start = time.monotonic()
    result = train(vault, "bench", plays, config, progress=progress)
    wall = time.monotonic() - start
    ratio = result.ppl_adapter / result.ppl_base
    report = {
        "corpus_bytes": corpus_bytes,
        "threads": config.threads or "auto",
        "cpu_count": os.cpu_count(),
        "load_average_1m_after": os.getloadavg()[0],
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "heldout_tokens": result.heldout_tokens,
        "wall_s": round(wall, 1),
        "wall_vs_15min_budget": round(wall / BUDGET_S, 3),
        "peak_rss_gb": round(result.peak_rss_bytes / 1e9, 3),
        "peak_rss_vs_4gb_budget": round(result.peak_rss_bytes / BUDGET_RSS, 3),
        "ppl_base": round(result.ppl_base, 3),
        "ppl_adapter": round(result.ppl_adapter, 3),
        "ppl_ratio_adapter_over_base": round(ratio, 3),
        "ppl_drop_pct": round(100 * (1 - ratio), 1),
        "stopped_early": result.stopped_early,
        "audit": (result.audit or {}).get("verdict"),
        "sample_prompt": result.sample_prompt,
        "sample_base": result.sample_base,
        "sample_adapter": result.sample_adapter,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"corpus {corpus_bytes / 1e3:.0f} KB, {result.train_tokens:,} training tokens, {result.steps} steps, "
              f"threads {report['threads']} of {os.cpu_count()} cores")
        print(f"wall time      {wall / 60:6.2f} min   = {report['wall_vs_15min_budget']:.2f} x the 15 min budget")
        rss_ratio = report["peak_rss_vs_4gb_budget"]
        print(f"peak RSS       {report['peak_rss_gb']:6.2f} GB    = {rss_ratio:.2f} x the 4 GB budget")
        print(f"held-out ppl   base {result.ppl_base:.2f} -> adapter {result.ppl_adapter:.2f}: ratio {ratio:.3f} "
              f"(drop {100 * (1 - ratio):.1f}%, target >= 20%)")
        print(f"sample prompt  {result.sample_prompt!r}")
        print(f"base           {result.sample_base!r}")
        print(f"adapter        {result.sample_adapter!r}")
    ok = wall <= BUDGET_S and result.peak_rss_bytes < BUDGET_RSS and ratio <= TARGET_PPL_RATIO
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
