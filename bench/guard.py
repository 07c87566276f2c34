#!/usr/bin/env python3
"""Guard screening latency: the shipped classifier against one base-model forward pass.

Per-prompt wall time (p50, p99) of ``screen_messages`` on held-out prompts, in two sizes:

    chat   prompts under 128 tokens (held-out direct, benign and XSTest prompts) in English
    chat_multilingual   the same in other languages: the ones the multilingual reader reads (non-Latin scripts,
                        and Latin-script texts the language identifier gives to another language than English)
    long   prompts of 1,000+ tokens (held-out buried requests and long benign texts)

measured with the process pinned to 1 CPU and to 2 CPUs (the screen itself is single-threaded).
The baseline, measured in the same run on the same prompts, is what a guard built on the base
model would pay at the very least: one llama.cpp forward pass of the prompt through the
embedded SmolLM2-135M (2 threads), no generation. Ratios are baseline / ours (> 1: we are faster).
Also: the output screen on a 256-token answer (it runs every 16 tokens while streaming), the chat-sized
prompts' score with the multilingual reader and without it (interleaved, 1 CPU: for English prompts that is the
language identifier's cost, for the others the reader's), and the encoder alone: its int8 onnxruntime graph (what runs) against its float32 numpy reference (what
ran before it), on the same windows, 1 CPU.

If bench/guard_audit.py exists (the adapter audit's benchmark) its main() runs afterwards.

    python bench/guard.py [--runs 3] [--baseline-prompts 12] [--json] [--skip-audit]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from runtime.guard.screen import (WEIGHTS_PATH, ScreenModel, load_heldout, load_model, read_weights,  # noqa: E402
                                  screen_messages, screen_text_output)


def _tokens(llm, text: str) -> int:
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False))


def _pct(xs: list[float]) -> dict[str, float]:
    ms = np.array(xs) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(xs)}


def _time_screen(model, prompts: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        for p in prompts:
            model.encoder.clear_memo()  # cold: repeated passes must not hit the encoder's window memo
            t0 = time.perf_counter()
            screen_messages(model, [{"role": "user", "content": p}])
            out.append(time.perf_counter() - t0)
    return out


def _time_reader(model, prompts: list[str], runs: int) -> dict[str, float]:
    """The screen's score with the multilingual reader (as shipped) and without it, interleaved per prompt."""
    on, off = [], []
    for _ in range(runs):
        for p in prompts:
            for flag, acc in ((True, on), (False, off)):
                model.encoder.clear_memo()
                t0 = time.perf_counter()
                model.score(p, multilingual=flag)
                acc.append(time.perf_counter() - t0)
    return {"with_reader_p50_ms": _pct(on)["p50_ms"], "without_reader_p50_ms": _pct(off)["p50_ms"],
            "ratio_with_over_without_median": statistics.median(on) / statistics.median(off)}


def _time_forward(llm, prompts: list[str]) -> list[float]:
    out = []
    for p in prompts:
        toks = llm.tokenize(p.encode("utf-8"))[: llm.n_ctx() - 1]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        out.append(time.perf_counter() - t0)
    return out


def _time_encoder(model, reference, prompts: list[str]) -> dict[str, float]:
    """Encoder alone on each prompt's windows (up to the screen's cap): int8 graph vs float32 reference."""
    from runtime.guard.features import featurize
    from runtime.guard.screen import MAX_ENCODER_WINDOWS

    enc = model.encoder
    int8_t, ref_t = [], []
    for p in prompts:
        windows = enc.windows(featurize(p).words)[:MAX_ENCODER_WINDOWS]
        t0 = time.perf_counter()
        enc._forward(windows)
        t1 = time.perf_counter()
        reference.encoder.reference_forward(windows)
        int8_t.append(t1 - t0)
        ref_t.append(time.perf_counter() - t1)
    return {"int8_p50_ms": _pct(int8_t)["p50_ms"], "float32_p50_ms": _pct(ref_t)["p50_ms"],
            "ratio_float32_over_int8_median": statistics.median(ref_t) / statistics.median(int8_t)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="passes over the prompt sets for the screen")
    parser.add_argument("--baseline-prompts", type=int, default=12, help="prompts per size for the llama.cpp baseline")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-audit", action="store_true", help="do not run bench/guard_audit.py afterwards")
    args = parser.parse_args(argv)

    from llama_cpp import Llama

    from runtime.models import default_model

    base = default_model()
    llm = Llama(model_path=str(base.path), n_ctx=2048, n_threads=2, n_threads_batch=2, n_batch=512, verbose=False)
    rows = load_heldout()
    sizes: dict[str, list[str]] = {"chat": [], "chat_multilingual": [], "long": []}
    model = load_model()
    t0 = time.perf_counter()
    for r in rows:
        n = _tokens(llm, r["prompt"])
        if n < 128 and r["set"] in ("direct", "benign", "xstest_safe"):
            other = model.multilingual is not None and model.multilingual.cut(r["prompt"]) is not None
            sizes["chat_multilingual" if other else "chat"].append(r["prompt"])
        elif n >= 1000:
            sizes["long"].append(r["prompt"])
    print(f"sorted {len(rows)} held-out prompts by token count and language in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    screen_messages(model, [{"role": "user", "content": "warm up"}])
    # the float32 reference the int8 graph is timed against (the run-time model drops its float32 layers)
    reference = ScreenModel(*read_weights(WEIGHTS_PATH.read_bytes()), int8=False)
    results: dict[str, dict] = {}
    cpus = sorted(os.sched_getaffinity(0))
    for size, prompts in sizes.items():
        if not prompts:
            continue
        res: dict[str, dict] = {}
        for ncpu in (1, 2):
            os.sched_setaffinity(0, cpus[:ncpu])
            res[f"screen_{ncpu}cpu"] = _pct(_time_screen(model, prompts, args.runs))
        os.sched_setaffinity(0, cpus[:1])
        res["encoder_1cpu"] = _time_encoder(model, reference, prompts[: 20 * args.baseline_prompts])
        if size.startswith("chat"):
            res["reader_1cpu"] = _time_reader(model, prompts[: 20 * args.baseline_prompts], 1)
        os.sched_setaffinity(0, cpus[:2])
        sample = prompts[: args.baseline_prompts]
        print(f"{size}: screen timed; llama.cpp baseline on {len(sample)} prompts", file=sys.stderr)
        base_t = _time_forward(llm, sample)
        ours_t = _time_screen(model, sample, 1)
        res["llama_forward_2threads"] = _pct(base_t)
        res["ratio_forward_over_screen_median"] = statistics.median(base_t) / statistics.median(ours_t)
        res["median_tokens"] = float(np.median([_tokens(llm, p) for p in prompts]))
        results[size] = res
    os.sched_setaffinity(0, cpus)
    answer = " ".join(["Here is a simple plan for your week: start each morning with a short walk, then work on the"
                       " most important task first."] * 12)
    out_t = []
    for _ in range(50):
        model.encoder.clear_memo()
        t0 = time.perf_counter()
        screen_text_output(model, answer)
        out_t.append(time.perf_counter() - t0)
    results["output_256_tokens"] = {**_pct(out_t), "tokens": _tokens(llm, answer)}

    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    else:
        print(f"guard screen latency (held-out prompts; baseline = one llama.cpp forward pass of {base.name}, 2 threads)")
        for size in ("chat", "chat_multilingual", "long"):
            if size not in results:
                continue
            r = results[size]
            print(f"  {size:17s} ({r['screen_1cpu']['n'] // args.runs} prompts, median {r['median_tokens']:.0f} tokens): "
                  f"1 cpu p50 {r['screen_1cpu']['p50_ms']:.2f} ms p99 {r['screen_1cpu']['p99_ms']:.2f} ms | "
                  f"2 cpus p50 {r['screen_2cpu']['p50_ms']:.2f} ms p99 {r['screen_2cpu']['p99_ms']:.2f} ms | "
                  f"forward p50 {r['llama_forward_2threads']['p50_ms']:.1f} ms -> "
                  f"{r['ratio_forward_over_screen_median']:.0f}x faster")
            if "reader_1cpu" in r:
                m = r["reader_1cpu"]
                print(f"        score with the multilingual reader p50 {m['with_reader_p50_ms']:.2f} ms, without "
                      f"{m['without_reader_p50_ms']:.2f} ms -> {m['ratio_with_over_without_median']:.2f}x")
            e = r["encoder_1cpu"]
            print(f"        encoder alone, 1 cpu: int8 graph p50 {e['int8_p50_ms']:.2f} ms, float32 reference p50 "
                  f"{e['float32_p50_ms']:.2f} ms -> {e['ratio_float32_over_int8_median']:.1f}x faster")
        o = results["output_256_tokens"]
        print(f"  output screen on a {o['tokens']}-token answer: p50 {o['p50_ms']:.2f} ms, p99 {o['p99_ms']:.2f} ms")
    del llm

    audit_bench = Path(__file__).resolve().parent / "guard_audit.py"
    if audit_bench.exists() and not args.skip_audit:
        spec = importlib.util.spec_from_file_location("bench_guard_audit", audit_bench)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        module.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
