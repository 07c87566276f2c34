"""`vault audit NAME`: check a sealed adapter for abliteration before it is ever loaded."""

from __future__ import annotations

from typing import Any

import click
from rich.text import Text

from cli.render import console, err_console, print_json, print_table

__all__ = ["COMMANDS"]

_STYLE = {"pass": "green", "warn": "yellow", "reject": "bold red"}


def _base_for(entry: Any) -> Any:
    from runtime.models import resolve
    from vault.errors import BaseModelError
    from vault.paths import vault_home

    base = resolve(entry.base_name, cache_dir=vault_home())
    if base.sha256 != entry.base_sha256:
        raise BaseModelError(
            f"adapter {entry.name!r} was sealed for {entry.base_name} (sha256 {entry.base_sha256[:12]}...), "
            f"but that name resolves to a model with sha256 {base.sha256[:12]}..."
        )
    return base


def _render(name: str, report: Any) -> None:
    out = console()
    verdict = Text(report.verdict.upper(), style=_STYLE.get(report.verdict, "bold"))
    line = Text(f"{name}: ").append(verdict)
    if report.details.get("forced"):
        line.append("  (forced by the owner; logged)", style="yellow")
    if report.cached:
        line.append("  (cached verdict)", style="dim")
    out.print(line)
    for reason in report.reasons:
        out.print(Text(f"  - {reason}"))
    static = report.details.get("static") or {}
    top = static.get("top") or []
    if top:
        print_table(
            ["layer", "module", "rank", "suppression", "direction", "alignment"],
            [(m["layer"], m["module"], m["rank"], f"{m['suppression']:.3f}", m["direction"], f"{m['alignment']:.3f}")
             for m in top],
            title="o_proj/down_proj updates most against the refusal directions",
        )
    behaviour = report.details.get("behaviour")
    if behaviour:
        n = behaviour["n"]
        with_adapter = "not measured" if behaviour["adapter_refusals"] is None else f"{behaviour['adapter_refusals']}/{n}"
        out.print(Text(
            f"behaviour ({behaviour['status']}): refusals base {behaviour['base_refusals']}/{n}, with adapter "
            f"{with_adapter}; first-token KL mean {behaviour['kl_mean']:.3f}, max {behaviour['kl_max']:.3f} nats"
        ))
    if "seconds" in report.details:
        out.print(Text(f"audit took {report.details['seconds'] * 1000:.0f} ms", style="dim"))


@click.command("audit")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True,
              help="Owner override: allow loading an adapter the audit rejected. Logged in "
                   "VAULT_HOME/logs/audit.log; refused for adapters received under licence.")
@click.option("--behaviour/--no-behaviour", default=True, show_default=True,
              help="Also compare base and base+adapter on fixed harmful prompts with llama.cpp "
                   "(refusals and first-token KL; a few seconds on the first audit).")
def audit_cmd(name: str, as_json: bool, force: bool, behaviour: bool) -> None:
    """Audit adapter NAME for abliteration (removal of the base model's refusal direction).

    The static check compares the adapter's o_proj/down_proj updates with the base
    model's harmful-vs-harmless directions (computed from the base alone). The
    behavioural check compares refusals and first-token KL with and without the
    adapter; on a base that rarely refuses it is reported as uninformative.
    Verdicts are pass, warn or reject; a rejected adapter is never loaded unless
    its owner runs this command with --force. Verdicts are cached (keyed by the
    adapter, base and guard version, MACed with a key in the keyring) and shown by
    `vault list`. Exit status 16 when the verdict is reject and not forced.
    """
    from runtime import memfd
    from runtime.guard.audit import audit_adapter, require_loadable
    from vault.adapter import load_blob
    from vault.store import Vault

    vault = Vault()
    entry = vault.get(name)
    base = _base_for(entry)
    blob = vault.open(name)
    engines: list[Any] = []

    def make_engine() -> Any:
        from runtime.engine import Engine

        engines.append(Engine(base))
        return engines[-1]

    try:
        tensors, meta = load_blob(blob)
        report = audit_adapter(tensors, meta, base, vault=vault, engine_factory=make_engine if behaviour else None,
                               force=force, name=name)
    finally:
        for engine in engines:
            engine.close()
        memfd.zero(blob)
    if as_json:
        print_json({"name": name, **report.to_json()})
    else:
        _render(name, report)
    if report.details.get("forced"):
        err_console().print("vault: the owner forced this adapter past a reject verdict (logged)")
    require_loadable(report)


COMMANDS = [audit_cmd]
