"""Store commands: init, add, list, show, remove, rotate, recover, doctor.

Each command parses its arguments, calls vault.store, and renders the result; errors are VaultError
subclasses that cli/main.py turns into a one-line message and the error's exit code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from cli.render import console, err_console, human_size, print_json, print_table, progress_bar, short
from vault import age
from vault.errors import NoIdentityError, UsageError
from vault.fsio import atomic_write
from vault.store import Entry, Vault

__all__ = ["COMMANDS"]

PASSPHRASE_ENV = "VAULT_RECOVERY_PASSPHRASE"
_CHECK_MARK = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "skip": "[dim]skip[/]"}
SOURCE_WARNING = (
    "the plaintext source was overwritten with zeros and deleted. This is best effort: on copy-on-write "
    "filesystems (btrfs, ZFS, APFS), on SSDs (wear levelling), in snapshots and in backups old copies can "
    "survive. If the plaintext ever sat on such a disk, treat it as exposed."
)


def _passphrase(*, confirm: bool) -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        value = click.prompt(
            "Passphrase for the recovery file", hide_input=True, confirmation_prompt=confirm, err=True
        )
    if not value:
        raise UsageError("the recovery passphrase must not be empty")
    return value.encode("utf-8")


def _audit_text(audit: Any) -> str:
    if isinstance(audit, dict) and isinstance(audit.get("verdict"), str):
        return audit["verdict"]
    return "not audited" if audit is None else str(audit)


def _licence_text(licence: Any) -> str:
    """'own' for a local adapter; for an imported one its permitted uses and expiry (see vault.licence)."""
    if not licence:
        return "own"
    from vault.errors import LicenceError
    from vault.licence import Licence, format_time

    try:
        lic = Licence.from_dict(licence)
    except LicenceError:
        return "licence damaged (every use refused)"
    until = f"until {format_time(lic.expires)}" if lic.expires else "no expiry"
    state = " EXPIRED" if lic.expired() else ""
    guard = ", guard required" if lic.guard_required else ""
    return f"{','.join(sorted(lic.uses))} {until}{state}{guard}"


@click.command("init")
@click.option(
    "--recovery-file", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the recovery key to this file, encrypted with a passphrase (age scrypt) instead of "
    f"showing it. The passphrase is prompted twice, or read from ${PASSPHRASE_ENV}.",
)
def init_cmd(recovery_file: Path | None) -> None:
    """Create a vault: a device key in the OS keyring and a recovery key for you.

    Every adapter is sealed to both keys. The device key never leaves the keyring. The recovery key
    (AGE-SECRET-KEY-1...) is shown ONCE and stored nowhere: it is the only way to open the vault on
    another machine, and with the stock `age` tool it decrypts any sealed file directly.
    """
    if recovery_file is not None and recovery_file.exists():
        raise UsageError(f"{recovery_file} already exists; refusing to overwrite it")
    passphrase = _passphrase(confirm=True) if recovery_file is not None else None
    vault, recovery = Vault.create()
    out = console()
    out.print(f"Created a vault at [bold]{escape(str(vault.home))}[/] (device key in the OS keyring).")
    if recovery_file is not None and passphrase is not None:
        try:
            sealed = age.encrypt(recovery.encode("ascii") + b"\n", [age.ScryptRecipient(passphrase)], armor=True)
            atomic_write(recovery_file, sealed)
        except Exception:
            out.print(Panel(recovery, title="could not write the recovery file: WRITE THIS KEY DOWN NOW", expand=False))
            raise
        out.print(
            f"Recovery key written to [bold]{escape(str(recovery_file))}[/], "
            "encrypted with your passphrase (age scrypt).\n"
            "Keep a copy OFF this machine. `age -d` with the passphrase reveals it."
        )
        return
    out.print(Panel(recovery, title="RECOVERY KEY: write this down now", subtitle="shown once, stored nowhere",
                    expand=False))
    out.print(
        "Without this key a lost or reinstalled machine means lost adapters.\n"
        "Keep it on paper or in a password manager, never next to the vault."
    )


@click.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--base", help="Base model the adapter is for: the embedded default's name, a registered name or "
              "a GGUF path (default: the base the adapter declares).")
@click.option("--force", is_flag=True, help="Replace an adapter of the same name.")
@click.option("--remove-source", is_flag=True, help="After sealing, overwrite and delete the plaintext files "
              "(best effort: not reliable on SSDs or copy-on-write filesystems).")
def add_cmd(name: str, path: Path, base: str | None, force: bool, remove_source: bool) -> None:
    """Validate and seal the adapter at PATH as NAME.

    PATH is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or a llama.cpp
    GGUF LoRA file. The base model is resolved to its sha256 so the adapter is bound to it.
    """
    from runtime.models import resolve  # the CLI may import runtime; vault/ may not
    from vault.adapter import declared_base
    from vault.paths import vault_home

    vault = Vault()
    reference = base or declared_base(path)
    if not reference:
        raise UsageError("the adapter declares no base model; pass --base NAME|PATH")
    model = resolve(reference, cache_dir=vault_home())
    with progress_bar(f"adding {name}") as progress:
        entry = vault.add(
            name, path, base_name=model.name, base_sha256=model.sha256, force=force,
            remove_source=remove_source, progress=progress,
        )
    console().print(
        f"Sealed [bold]{entry.name}[/] ({human_size(entry.size)}, r={entry.r}, "
        f"{', '.join(entry.target_modules)}) for base {escape(entry.base_name)} (sha256 {short(entry.base_sha256)})."
    )
    if remove_source:
        err_console().print(f"[yellow]warning:[/] {SOURCE_WARNING}")


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_cmd(as_json: bool) -> None:
    """List the sealed adapters (name, base, rank, size, created, audit verdict, licence)."""
    entries = Vault().entries()
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    if not entries:
        console().print("The vault is empty. Add an adapter with: vault add NAME PATH")
        return
    print_table(
        ["name", "base", "r", "modules", "size", "created", "audit", "licence"],
        [
            (e.name, e.base_name, e.r, ",".join(e.target_modules), human_size(e.size), e.created,
             _audit_text(e.audit), _licence_text(e.licence))
            for e in entries
        ],
    )


def _show_dict(vault: Vault, entry: Entry) -> dict[str, Any]:
    data = entry.to_dict()
    data["sealed_file"] = str(vault.home / "objects" / entry.object)
    return data


@click.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show_cmd(name: str, as_json: bool) -> None:
    """Show everything the sealed index knows about adapter NAME."""
    vault = Vault()
    data = _show_dict(vault, vault.get(name))
    if as_json:
        print_json(data)
        return
    data["size"] = f"{human_size(data['size'])} ({data['size']} bytes)"
    data["target_modules"] = ", ".join(data["target_modules"])
    data["audit"] = _audit_text(data["audit"])
    licence = data["licence"]
    data["licence"] = _licence_text(licence)
    if licence and isinstance(licence, dict):
        data["licensor key"] = f"sha256:{licence.get('licensor', {}).get('signing_key', '?')}"
        data["licence terms"] = licence.get("terms", "")
    print_table(["field", "value"], [(k, v) for k, v in data.items() if k != "object"], title=name)


@click.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def remove_cmd(name: str, yes: bool) -> None:
    """Remove adapter NAME from the vault (its sealed file is deleted)."""
    vault = Vault()
    vault.get(name)
    if not yes:
        click.confirm(f"Remove {name!r} from the vault? This cannot be undone", abort=True, err=True)
    vault.remove(name)
    console().print(f"Removed {name}.")


@click.command("rotate")
def rotate_cmd() -> None:
    """Make a new device key and re-wrap every sealed file to it.

    The old key leaves the keyring only after every file is re-wrapped. If a rotate is interrupted,
    the vault stays openable and the next `vault rotate` finishes it. The recovery key is unchanged.
    """
    vault = Vault()
    with progress_bar("rotating") as progress:
        vault.rotate(progress=progress)
    console().print(f"Rotated the device key; new recipient {vault.config['device_recipient']}.")


@click.command("recover")
@click.option("--recovery-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"The passphrase-encrypted recovery file written by `vault init --recovery-file` "
              f"(passphrase prompted, or ${PASSPHRASE_ENV}).")
def recover_cmd(recovery_file: Path | None) -> None:
    """Take over a vault on a new machine with the recovery key.

    Copy the vault directory (from your backup) to VAULT_HOME first. The recovery key is read from
    --recovery-file or from stdin (prompted, hidden, on a terminal). A new device key is made, stored in
    this machine's keyring, and every sealed file is re-wrapped to it.
    """
    if recovery_file is not None:
        sealed = recovery_file.read_bytes()
        try:
            plaintext = age.decrypt(sealed, [age.ScryptIdentity(_passphrase(confirm=False))])
        except NoIdentityError:
            raise NoIdentityError(
                f"wrong passphrase for {recovery_file} (or not a passphrase-encrypted file)"
            ) from None
        key = plaintext.decode("ascii", "replace").strip()
        plaintext[:] = bytes(len(plaintext))
    elif sys.stdin.isatty():
        key = click.prompt("Recovery key (AGE-SECRET-KEY-1...)", hide_input=True, err=True)
    else:
        key = sys.stdin.readline().strip()
    with progress_bar("recovering") as progress:
        vault = Vault.recover(key, progress=progress)
    console().print(
        f"Recovered the vault at {escape(str(vault.home))}: {len(vault.entries())} adapters, "
        "new device key in this keyring."
    )


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--fix", is_flag=True, help="Repair what is safe: file modes, orphaned and temporary files, "
              "a stale config.json.")
def doctor_cmd(as_json: bool, fix: bool) -> None:
    """Check the keyring, file permissions and the integrity of every sealed file.

    Exits 1 if any check fails.
    """
    checks = Vault().doctor(fix=fix)
    if as_json:
        print_json([c.to_dict() for c in checks])
    else:
        rows = [(c.name, Text.from_markup(_CHECK_MARK[c.status]), c.detail) for c in checks]
        print_table(["check", "status", "detail"], rows)
    if any(c.status == "fail" for c in checks):
        sys.exit(1)  # not ctx.exit: cli.main runs click with standalone_mode=False, which drops Exit codes


COMMANDS = [init_cmd, add_cmd, list_cmd, show_cmd, remove_cmd, rotate_cmd, recover_cmd, doctor_cmd]
