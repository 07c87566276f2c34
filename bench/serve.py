"""What the HTTP layer costs: `vault serve` (real openai client over loopback) against calling
runtime.chat.respond directly, in the same process, on the same engine, interleaved (ABAB...) so
machine load hits both sides alike.

Prints completion tokens/s and first-token latency for both sides and their ratios, then the
throughput of 8 concurrent clients against the same number of requests sent one by one.

    python3 bench/serve.py [--rounds 6] [--max-tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai  # noqa: E402

from runtime.chat import respond  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.guard.base import PassThroughGuard  # noqa: E402
from runtime.models import default_model  # noqa: E402
from runtime.server import ChatServer, ServerLimits  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long essay about the history of Rome, with many sections."}]
TOKEN = "bench-token-not-secret"


def direct(engine: Engine, max_tokens: int) -> tuple[float, float, int]:
    """(seconds, seconds to first text, completion tokens) calling chat.respond in-process."""
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in respond(engine, PassThroughGuard(), PROMPT, max_tokens=max_tokens, temperature=0, seed=1):
        if chunk.text and first is None:
            first = time.perf_counter() - start
        tokens = chunk.completion_tokens or tokens
    return time.perf_counter() - start, first or 0.0, tokens


def served(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[float, float, int]:
    """The same request through `vault serve`'s HTTP API, streamed."""
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0,
                                                seed=1, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return time.perf_counter() - start, first or 0.0, tokens


def concurrent(client_factory, model: str, clients: int, per_client: int, max_tokens: int) -> float:
    errors: list[BaseException] = []

    def work() -> None:
        c = client_factory()
        for _ in range(per_client):
            try:
                c.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0)
            except BaseException as exc:  # noqa: BLE001 - counted
                errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} concurrent requests failed: {errors[0]!r}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    engine = Engine(default_model(), n_ctx=1024, n_threads=args.threads)
    base = engine.base.name
    server = ChatServer(functools.partial(respond, engine, PassThroughGuard()), base_name=base, adapters=[],
                        token=TOKEN, limits=ServerLimits(max_tokens_cap=max(args.max_tokens, 8)))
    server.start()
    make_client = functools.partial(openai.OpenAI, base_url=server.url, api_key=TOKEN, max_retries=0)
    client = make_client()
    try:
        direct(engine, 4)  # warm both paths once
        served(client, base, 4)
        d_runs, s_runs = [], []
        for _ in range(args.rounds):
            d_runs.append(direct(engine, args.max_tokens))
            s_runs.append(served(client, base, args.max_tokens))

        def tps(runs: list[tuple[float, float, int]]) -> float:
            return statistics.median(tok / sec for sec, _, tok in runs)

        def ttft(runs: list[tuple[float, float, int]]) -> float:
            return statistics.median(first for _, first, _ in runs)

        print(f"rounds={args.rounds} max_tokens={args.max_tokens} threads={engine.n_threads} "
              f"tokens/run={s_runs[0][2]}")
        print(f"direct chat.respond : {tps(d_runs):7.1f} tok/s   first text {ttft(d_runs) * 1000:6.0f} ms")
        print(f"vault serve (HTTP)  : {tps(s_runs):7.1f} tok/s   first text {ttft(s_runs) * 1000:6.0f} ms")
        print(f"ratio tokens/s served/direct = {tps(s_runs) / tps(d_runs):.3f}")
        print(f"ratio first-text  served/direct = {ttft(s_runs) / ttft(d_runs):.3f}")

        n_clients, per_client, small = 8, 4, 8
        sequential = time.perf_counter()
        for _ in range(n_clients * per_client):
            client.chat.completions.create(model=base, messages=PROMPT, max_tokens=small, temperature=0)
        sequential = time.perf_counter() - sequential
        parallel = concurrent(make_client, base, n_clients, per_client, small)
        print(f"{n_clients * per_client} requests x {small} tokens: one client {sequential:.2f} s, "
              f"{n_clients} concurrent clients {parallel:.2f} s, ratio concurrent/sequential = "
              f"{parallel / sequential:.3f} (one context: requests queue; errors: 0)")
    finally:
        server.stop(drain_timeout=30)
        engine.close()


if __name__ == "__main__":
    main()
