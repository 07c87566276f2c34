"""The `vault` command: a thin click layer over vault/ and runtime/.

Commands live in one module per feature (cli/store.py, cli/run.py, ...). Each
module exposes ``COMMANDS``, a list of click commands; they are imported lazily so
that `vault list` does not pay for loading llama.cpp or torch.

Every library error is a ``VaultError``; it is caught here, in one place, and
becomes a one-line message on stderr and the error's own exit code. A traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import importlib
import sys

import click

from vault.errors import VaultError

__all__ = ["cli", "main"]

# command name -> module that defines it (module.COMMANDS holds click commands)
_COMMAND_MODULES: dict[str, str] = {
    # vault core (issue 2)
    "init": "cli.store", "add": "cli.store", "list": "cli.store", "show": "cli.store",
    "remove": "cli.store", "rotate": "cli.store", "recover": "cli.store", "doctor": "cli.store",
    # runtime (issue 3)
    "models": "cli.run", "run": "cli.run", "serve": "cli.serve",
    # guard (issue 4)
    "audit": "cli.audit", "guard": "cli.guard",
    # sharing (issue 5)
    "identity": "cli.share", "trust": "cli.share", "export": "cli.share",
    "verify": "cli.share", "import": "cli.share", "trace": "cli.share",
    # training (issue 6)
    "train": "cli.train",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module_name = _COMMAND_MODULES.get(name)
        if module_name is None:
            return None
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # the feature is not built yet
                return None
            raise
        for command in getattr(module, "COMMANDS", []):
            if command.name == name:
                return command
        return None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="vault-llm", prog_name="vault")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """vault: own a personal language model and keep it your own.

    Adapters are sealed at rest (age v1) to a device key in the OS keyring and a
    paper recovery key; they are decrypted only into memory by a guarded runtime.
    The vault lives in VAULT_HOME (default: the platform's user data dir).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn VaultError into a one-line message + exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="vault", standalone_mode=False)
    except VaultError as exc:
        if debug:
            raise
        click.echo(f"vault: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("vault: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("vault: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - last resort: never a traceback without --debug
        if debug:
            raise
        click.echo(f"vault: internal error: {type(exc).__name__}: {exc} (run with --debug for details)", err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
