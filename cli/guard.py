"""`vault guard screen|eval`: the guard's screening classifier from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cli.render import console, print_json, print_table

__all__ = ["COMMANDS"]

_MAX_LINE = 4 * 1024 * 1024  # one JSON line; longer input is refused, not truncated


def _messages(obj: Any) -> list[dict[str, Any]]:
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
        return msgs
    if isinstance(obj.get("prompt"), str):
        return [{"role": "user", "content": obj["prompt"]}]
    raise ValueError('expected {"prompt": "..."} or {"messages": [...]}')


@click.group("guard")
def guard_group() -> None:
    """Screen prompts and evaluate the guard's classifier.

    The guard runs inside `vault run` and `vault serve` on every user turn and on the
    generated text. These commands expose the same classifier for testing and evaluation;
    its weights are shipped with vault and checked against a pinned sha256 when loaded.
    """


@guard_group.command("screen")
@click.option("--output", "as_output", is_flag=True,
              help="Judge each text as model output (the output screen) instead of as a user prompt.")
@click.option("--log", "to_log", is_flag=True,
              help="Also record each verdict in the guard log (VAULT_HOME/logs/guard.log: hashes only, "
                   "text only with VAULT_LOG_PROMPTS=1).")
def screen_cmd(as_output: bool, to_log: bool) -> None:
    """Read JSON lines on stdin, write one verdict line per input on stdout.

    \b
    Input:  {"prompt": "..."}  or  {"messages": [{"role": "user", "content": "..."}, ...]}
    Output: {"allowed": true|false, "category": "S1".."S14"|null, "score": 0..1}

    With {"messages": ...} the last user turn is judged in the context of the earlier
    turns. score >= 0.5 means blocked; category is an MLCommons hazard id. A line that
    cannot be parsed gets {"error": "..."} and the command exits with status 2 at the end.
    """
    from runtime.guard.screen import load_model, screen_messages, screen_text_output

    model = load_model()
    guard = None
    if to_log:
        from runtime.guard.guard import VaultGuard

        guard = VaultGuard(model=model)
    failed = False
    out = sys.stdout
    for n, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            if len(line) > _MAX_LINE:
                raise ValueError(f"line longer than {_MAX_LINE} bytes")
            msgs = _messages(json.loads(line))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            failed = True
            out.write(json.dumps({"error": f"line {n}: {exc}"}) + "\n")
            out.flush()
            continue
        if as_output:
            text = "\n".join(str(m.get("content", "")) for m in msgs if m.get("role") in ("user", "assistant"))
            verdict = guard.screen_output(text, msgs) if guard else screen_text_output(model, text)
        else:
            verdict = guard.screen_prompt(msgs) if guard else screen_messages(model, msgs)
        out.write(json.dumps(verdict.to_json()) + "\n")
        out.flush()
    if failed:
        sys.exit(2)


@guard_group.command("eval")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSONL file of {set, prompt, label} rows (default: the shipped held-out data).")
@click.option("--by-length", is_flag=True,
              help="Split every set by prompt length: chat (< 127 WordPiece tokens), mid (127-999), long (1,000+).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def eval_cmd(data: Path | None, by_length: bool, as_json: bool) -> None:
    """Recall, false-positive rate and latency on held-out prompts.

    The shipped held-out data was never used for training: held-out written requests,
    framings, jailbreak wrappers and long texts, half of AdvBench and half of XSTest
    (see runtime/guard/DATA_CARD.md). Harmful sets report recall (share blocked), benign
    sets the false-positive rate. Latency is per prompt, single process, this machine.
    """
    from runtime.guard.screen import evaluate, load_heldout, load_model

    model = load_model()
    table = evaluate(model, load_heldout(data), by_length=by_length)
    if as_json:
        print_json({"guard": model.version, "sets": table})
        return
    rows = []
    for r in table:
        acc = "" if r["category_accuracy"] is None else f"{r['category_accuracy']:.1%}"
        rows.append([r["set"], r["n"], r["metric"], f"{r['value']:.1%}", acc,
                     f"{r['median_tokens']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"])
    print_table(["set", "n", "metric", "value", "category acc.", "median tokens", "p50 ms", "p99 ms"], rows,
                title=f"guard {model.version} on held-out data")
    console().print("recall = share of harmful prompts blocked; fpr = share of benign prompts blocked")


COMMANDS = [guard_group]
