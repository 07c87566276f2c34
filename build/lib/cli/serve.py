"""`vault serve`: the OpenAI-compatible API over the guarded runtime.

Parsing, wiring and reporting only: runtime.loader opens the engine and decrypts adapters into
memory, runtime.chat screens every request through the guard, runtime.server speaks HTTP.
The URL goes to stdout; status and the per-request log (method, path, status, latency; never
prompt text) go to stderr.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from types import FrameType
from typing import Any

import click

from cli.render import console, err_console, help_with_guard_status
from vault.errors import UsageError

__all__ = ["COMMANDS"]

DEFAULT_PORT = 8642


def _open_vault() -> Any:
    from vault.store import Vault

    return Vault()


def _log_line(method: str, path: str, status: int, seconds: float) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    err_console().print(f"{stamp} {method} {path} {status} {seconds * 1000:.0f}ms", markup=False)


class _StopSignal:
    """Catches SIGINT/SIGTERM once (installed before the URL is printed, so none is missed);
    after the first, signals get their default behaviour again (a second ^C kills)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self._event = threading.Event()
        signal.signal(signal.SIGINT, self._handler)
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._event.set()

    def wait(self) -> str:
        while not self._event.wait(1.0):
            pass
        return self.received[0]


@click.command("serve")
@click.argument("names", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --allow-remote.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port (0: pick a free one and print it).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a non-loopback --host. The API is plain HTTP: put TLS in front of it.")
@click.option("--show-token", is_flag=True,
              help="Print the API token (creating it on first use) and exit.")
@click.option("--new-token", is_flag=True, help="Replace the API token with a fresh one before starting.")
@click.option("--base", help="Base model: a registered name or a GGUF path (default: the embedded SmolLM2).")
@click.option("--max-tokens-cap", type=click.IntRange(1, 8192), default=512, show_default=True,
              help="Largest max_tokens a request may ask for (larger requests get a 400).")
@click.option("--queue", "queue_size", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests that may wait for the model; past that, clients get 503 + Retry-After.")
@click.option("--threads", type=click.IntRange(1, 256), help="llama.cpp threads (default: physical cores).")
def serve_cmd(names: tuple[str, ...], host: str, port: int, allow_remote: bool, show_token: bool, new_token: bool,
              base: str | None, max_tokens_cap: int, queue_size: int, threads: int | None) -> None:
    """Serve sealed adapters NAME... over an OpenAI-compatible HTTP API.

    Endpoints: GET /v1/models and POST /v1/chat/completions (streaming too). A request's "model"
    picks an adapter by its vault name, or the base model by its name for none. Adapters are
    decrypted into memory once, at start.

    Listens on 127.0.0.1 only unless --allow-remote. Every request needs the bearer token, which
    is generated once and kept in the OS keyring: use it as the OpenAI API key, e.g.

    \b
        export OPENAI_BASE_URL=http://127.0.0.1:8642/v1
        export OPENAI_API_KEY=$(vault serve --show-token)

    One request is generated at a time (one llama.cpp context); others wait in a bounded queue.
    SIGINT/SIGTERM stop gracefully: no new requests, in-flight ones finish, exit 0.
    """
    from runtime.server import check_bind_host, serve_token

    if show_token and (names or new_token):
        raise UsageError("--show-token only prints the token; run it on its own")
    check_bind_host(host, allow_remote)
    vault = _open_vault()
    token = serve_token(vault.keys, rotate=new_token)
    if show_token:
        click.echo(token)
        return
    if len(set(names)) != len(names):
        raise UsageError("each adapter name may be given once")
    _serve(vault, token, names, host=host, port=port, base=base, max_tokens_cap=max_tokens_cap,
           queue_size=queue_size, threads=threads)


def _serve(vault: Any, token: str, names: tuple[str, ...], *, host: str, port: int, base: str | None,
           max_tokens_cap: int, queue_size: int, threads: int | None) -> None:
    from runtime import loader
    from runtime.chat import respond
    from runtime.server import ChatServer, ServerLimits
    from vault.licence import enforcing

    err = err_console()

    def status(message: str) -> None:
        err.print(f"[dim]{message}[/]")

    engine = loader.open_engine(base, progress=status, **({"n_threads": threads} if threads else {}))
    try:
        guard = loader.default_guard(vault, engine=engine)  # the engine enables the behavioural audit
        if loader.guard_is_passthrough():
            err.print("[yellow]NOTE: the guard is a pass-through (runtime.guard.default_guard is not installed): "
                      "nothing is screened.[/]")
        if engine.base.name in names:
            raise UsageError(f"an adapter may not be called {engine.base.name!r}: that name selects the base model")
        for name in names:
            report = loader.attach(engine, vault, name, guard=guard, progress=status, use="serve")
            status(f"adapter {name} loaded from memory in {report.seconds:.2f} s (audit: {report.audit.verdict})")
        # licensed adapters: the licence is re-checked (expiry, 'serve') on every request, not only at load
        licensed = {name: entry for name in names if (entry := vault.get(name)).licence}
        server = ChatServer(
            enforcing(functools.partial(respond, engine, guard), licensed, "serve"),
            base_name=engine.base.name, adapters=list(names),
            token=token, host=host, port=port,
            limits=ServerLimits(max_tokens_cap=max_tokens_cap, queue_size=queue_size), on_request=_log_line,
        )
        stop = _StopSignal()
        server.start()
        out = console()
        out.print(f"vault serve: listening on {server.url}", markup=False, highlight=False)
        out.print(f"models: {', '.join([engine.base.name, *names])}", markup=False, highlight=False)
        out.print("token: send 'Authorization: Bearer <token>'; print it with `vault serve --show-token`",
                  markup=False, highlight=False)
        out.file.flush()
        why = stop.wait()
        status(f"{why}: stopping (finishing in-flight requests)")
        drained = server.stop()
        status("stopped" if drained else "stopped; some requests did not finish in time")
    finally:
        engine.close()


help_with_guard_status(serve_cmd, ("Every prompt and answer is screened by the guard (a blocked one is an ordinary completion with "
            "finish_reason \"content_filter\"); adapters are audited before they are loaded."))

COMMANDS = [serve_cmd]
