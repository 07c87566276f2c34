#!/usr/bin/env python3
"""Guard training: one encoder fine-tune step in bfloat16 autocast against float32, side by side.

A step of the guard's training (``runtime/guard/train_screen.py``): forward and backward of the 6-layer
all-MiniLM-L6-v2 encoder on 32 windows of 128 tokens, on 2 threads. bfloat16 is native on CPUs with
AVX512-BF16 or AMX and emulated elsewhere; this prints both times and the ratio (> 1: bfloat16 is
slower), and what ``train_screen`` would pick by default on this CPU. Needs the ``guard-train`` extra.

    python bench/guard_train_bf16.py [--reps 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="steps per precision, alternating (best is kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    import torch

    from runtime.guard.train_screen import _encoder_model, cpu_has_bf16

    torch.set_num_threads(2)
    torch.manual_seed(0)
    enc = _encoder_model(6)
    ids = torch.randint(1000, 30000, (32, 128))
    mask = torch.ones_like(ids)
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for _ in range(args.reps):
        for name in ("bf16", "fp32"):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                hidden = enc(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden.float().mean().backward()
            enc.zero_grad()
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    native = cpu_has_bf16()
    result = {"bf16_s": round(best["bf16"], 3), "fp32_s": round(best["fp32"], 3),
              "bf16_over_fp32": round(best["bf16"] / best["fp32"], 2), "native_bf16": native,
              "train_screen_default": "bf16" if native else "fp32"}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"encoder step (32 x 128 tokens, 2 threads): bfloat16 {result['bf16_s']:.2f} s, float32 "
              f"{result['fp32_s']:.2f} s, bfloat16/float32 {result['bf16_over_fp32']:.2f}x; native bfloat16: "
              f"{result['native_bf16']}; train_screen default here: {result['train_screen_default']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
