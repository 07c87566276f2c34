#!/usr/bin/env python3
"""The vault runtime against a plain llama-cpp-python script, same adapter, side by side in one run.

    tokens/s   plain: Llama(model, lora_path=FILE.gguf).create_chat_completion(...)
               vault: runtime.loader.attach_blob (sealed-format blob -> GGUF in memfd) + runtime.chat.respond
               (the default guard, as `vault run` uses it); greedy, same prompt, same max_tokens
    one-shot   plain: `python -c <load model + LoRA file, answer once>`
               vault: `python -m cli.main run NAME PROMPT` on a real vault in a private keyring
    peak RSS   of each one-shot process (wait4 rusage of that child alone)

Each measurement runs in a fresh process; the two sides alternate run by run and medians are compared.
Targets (issue 3): tokens/s ratio >= 0.95, one-shot wall ratio <= 1.3, vault RSS <= plain + adapter + 64 MiB.

    python bench/generate.py [--runs 3] [--max-tokens 128] [--rank 16] [--json]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROMPT = "Write a long story about a lighthouse keeper and a storm."
MODULES = {  # SmolLM2-135M: module -> (in, out)
    "self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}


def adapter_tensors(rank: int):
    import numpy as np

    rng = np.random.default_rng(7)
    out = {}
    for layer in range(30):
        for module, (fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            out[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / fan_in**0.5).astype("float32")
            out[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.01).astype("float32")
    return out


def peft_config(rank: int) -> dict:
    return {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": [m.split(".")[1] for m in MODULES],
            "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM"}


# -- child roles ------------------------------------------------------------------------------------


def role_plain_throughput(args: argparse.Namespace) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          lora_path=args.lora, verbose=False)
    msgs = [{"role": "user", "content": PROMPT}]
    llm.create_chat_completion(msgs, max_tokens=8, temperature=0)  # warm-up
    tokens, seconds, text = 0, 0.0, ""
    for _ in range(args.reps):
        start = time.perf_counter()
        r = llm.create_chat_completion(msgs, max_tokens=args.max_tokens, temperature=0)
        seconds += time.perf_counter() - start
        tokens += r["usage"]["completion_tokens"]
        text = r["choices"][0]["message"]["content"]
    return {"tokens": tokens, "seconds": seconds, "text": text}


def role_vault_throughput(args: argparse.Namespace) -> dict:
    from runtime import loader
    from runtime.chat import respond
    from runtime.guard.base import PassThroughGuard
    from runtime.models import default_model
    from vault.adapter import make_blob

    engine = loader.open_engine(None, n_ctx=args.n_ctx, n_threads=args.threads)
    base = default_model()
    blob = bytearray(make_blob(adapter_tensors(args.rank), peft_config(args.rank), base_name=base.name,
                               base_sha256=base.sha256))
    guard = PassThroughGuard() if args.passthrough else loader.default_guard(None, engine=engine)
    loader.attach_blob(engine, blob, "bench", guard=guard)
    msgs = [{"role": "user", "content": PROMPT}]
    list(respond(engine, guard, msgs, adapter="bench", max_tokens=8, temperature=0))  # warm-up
    tokens, seconds, text = 0, 0.0, ""
    for _ in range(args.reps):
        start = time.perf_counter()
        chunks = list(respond(engine, guard, msgs, adapter="bench", max_tokens=args.max_tokens, temperature=0))
        seconds += time.perf_counter() - start
        tokens += chunks[-1].completion_tokens
        text = "".join(c.text for c in chunks)
    return {"tokens": tokens, "seconds": seconds, "text": text, "guard": guard.name}


PLAIN_ONE_SHOT = """
import sys, llama_cpp
model, lora, n_ctx, threads, max_tokens, prompt = sys.argv[1:7]
llm = llama_cpp.Llama(model, n_ctx=int(n_ctx), n_threads=int(threads), n_threads_batch=int(threads),
                      lora_path=lora, verbose=False)
r = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=int(max_tokens), temperature=0)
print(r["choices"][0]["message"]["content"])
"""


# -- driver -----------------------------------------------------------------------------------------


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of that child, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss * 1024, out.decode()


def child(role: str, args: argparse.Namespace, env: dict[str, str], extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--reps", str(args.reps), "--max-tokens", str(args.max_tokens),
           "--rank", str(args.rank), "--n-ctx", str(args.n_ctx), "--threads", str(args.threads), *extra]
    _, _, out = timed(cmd, env)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="alternating runs per side (medians are compared)")
    p.add_argument("--reps", type=int, default=3, help="generations per throughput run")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--one-shot-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--n-ctx", type=int, default=0, help="0: what the vault runtime chooses")
    p.add_argument("--threads", type=int, default=0, help="0: what the vault runtime chooses")
    p.add_argument("--json", action="store_true")
    p.add_argument("--passthrough", action="store_true", help="tokens/s only: also time the vault runtime with the "
                   "pass-through guard, to separate the runtime's cost from the guard's screening")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--lora", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        fn = {"plain": role_plain_throughput, "vault": role_vault_throughput}[args.role]
        print(json.dumps(fn(args)))
        return

    from runtime.lora_gguf import convert
    from runtime.models import default_model, hardware_fit

    sys.path.insert(0, str(REPO / "tests"))
    from secret_service import SecretService

    base = default_model()
    fit = hardware_fit(base)
    args.n_ctx = args.n_ctx or fit.n_ctx
    args.threads = args.threads or fit.n_threads
    work = Path(tempfile.mkdtemp(prefix="vault-bench-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VAULT_HOME": str(work / "vault")}
    tensors = adapter_tensors(args.rank)
    gguf_path = work / "bench-lora.gguf"  # the baseline needs a file: a synthetic adapter, not a secret
    gguf = convert(tensors, peft_config(args.rank), n_head=9, n_head_kv=3)
    gguf_path.write_bytes(gguf)
    adapter_bytes = len(gguf)

    service = SecretService(work / "keyring").start()
    try:
        env.update(service.env)
        peft_dir = work / "peft"
        peft_dir.mkdir()
        import safetensors.numpy

        safetensors.numpy.save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
        (peft_dir / "adapter_config.json").write_text(json.dumps(peft_config(args.rank)))
        vault_cli = [sys.executable, "-m", "cli.main"]
        subprocess.run(vault_cli + ["init"], env=env, cwd=REPO, check=True, capture_output=True)
        subprocess.run(vault_cli + ["add", "bench", str(peft_dir)], env=env, cwd=REPO, check=True,
                       capture_output=True)

        tps: dict[str, list[float]] = {"plain": [], "vault": [], "vault_passthrough": []}
        wall = {"plain": [], "vault": []}
        rss = {"plain": [], "vault": []}
        texts: dict[str, str] = {}
        plain_cmd = [sys.executable, "-c", PLAIN_ONE_SHOT, str(base.path), str(gguf_path), str(args.n_ctx),
                     str(args.threads), str(args.one_shot_tokens), PROMPT]
        vault_cmd = vault_cli + ["run", "bench", PROMPT, "--max-tokens", str(args.one_shot_tokens),
                                 "--temperature", "0", "-q"]
        guard_name = ""
        for run in range(args.runs):
            order = ("plain", "vault") if run % 2 == 0 else ("vault", "plain")
            for side in order:
                extra = ["--model", str(base.path), "--lora", str(gguf_path)] if side == "plain" else []
                r = child(side, args, env, extra)
                tps[side].append(r["tokens"] / r["seconds"])
                texts[side] = r["text"]
                guard_name = r.get("guard", guard_name)
                if side == "vault" and args.passthrough:
                    r = child(side, args, env, ["--passthrough"])
                    tps["vault_passthrough"].append(r["tokens"] / r["seconds"])
            for side in order:
                seconds, peak, out = timed(plain_cmd if side == "plain" else vault_cmd, env)
                wall[side].append(seconds)
                rss[side].append(peak)
                texts[side + "_one_shot"] = out.strip()
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: {s: statistics.median(v[s]) for s in v if v[s]} for k, v in (("tps", tps), ("wall", wall), ("rss", rss))}
    result = {
        "runs": args.runs, "reps": args.reps, "max_tokens": args.max_tokens, "rank": args.rank,
        "n_ctx": args.n_ctx, "threads": args.threads, "adapter_gguf_bytes": adapter_bytes, "guard": guard_name,
        "tokens_per_s": med["tps"], "tokens_per_s_ratio": med["tps"]["vault"] / med["tps"]["plain"],
        "tokens_per_s_ratio_passthrough_guard": (med["tps"]["vault_passthrough"] / med["tps"]["plain"]
                                                 if "vault_passthrough" in med["tps"] else None),
        "one_shot_wall_s": med["wall"], "one_shot_wall_ratio": med["wall"]["vault"] / med["wall"]["plain"],
        "peak_rss_bytes": med["rss"], "rss_excess_over_plain_plus_adapter_mib":
            (med["rss"]["vault"] - med["rss"]["plain"] - adapter_bytes) / 2**20,
        "same_greedy_text": texts["plain"] == texts["vault"],
        "same_one_shot_text": texts["plain_one_shot"] == texts["vault_one_shot"],
        "all": {"tps": tps, "wall": wall, "rss": rss},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"same adapter: rank {args.rank}, all 7 modules x 30 layers, GGUF {adapter_bytes / 2**20:.1f} MiB; "
          f"n_ctx {args.n_ctx}, {args.threads} threads; guard: {guard_name}; {args.runs} alternating runs")
    print(f"tokens/s       plain {med['tps']['plain']:7.1f}   vault {med['tps']['vault']:7.1f}   "
          f"ratio {result['tokens_per_s_ratio']:.3f}  (target >= 0.95)")
    if result["tokens_per_s_ratio_passthrough_guard"] is not None:
        print(f"tokens/s       vault with the pass-through guard {med['tps']['vault_passthrough']:7.1f}   "
              f"ratio {result['tokens_per_s_ratio_passthrough_guard']:.3f}  (runtime cost without screening)")
    print(f"one-shot wall  plain {med['wall']['plain']:7.2f}s  vault {med['wall']['vault']:7.2f}s  "
          f"ratio {result['one_shot_wall_ratio']:.3f}  (target <= 1.3)")
    print(f"peak RSS       plain {med['rss']['plain'] / 2**20:7.1f}M  vault {med['rss']['vault'] / 2**20:7.1f}M  "
          f"excess over plain+adapter {result['rss_excess_over_plain_plus_adapter_mib']:.1f} MiB  (target <= 64)")
    print(f"greedy outputs identical: throughput {result['same_greedy_text']}, one-shot {result['same_one_shot_text']}")


if __name__ == "__main__":
    main()
