"""Sharing commands: identity, trust, export, verify, import.

Parse, call vault.identity / vault.trust / vault.bundle, render. Everything read from a bundle is
untrusted: it is shown through rich tables (markup escaped) after the licence schema has already
refused control characters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cli.render import console, err_console, human_size, print_json, print_table
from vault.bundle import export_bundle, import_bundle, verify_bundle
from vault.errors import UsageError
from vault.fsio import atomic_write
from vault.identity import MAX_IDENTITY_BYTES, PublicIdentity, load_identity
from vault.licence import USES, Licence, format_time, parse_expiry
from vault.store import Vault
from vault.trust import TrustStore

__all__ = ["COMMANDS"]

_TEMPLATE_KEYS = {"terms", "uses", "expires", "guard_required"}
_MAX_TERMS_FILE = 64 * 1024


def _read_identity_source(source: str) -> PublicIdentity:
    """A path to an identity/PEM file, or the PEM text itself."""
    path = Path(source)
    if "BEGIN PUBLIC KEY" not in source and path.is_file():
        if path.stat().st_size > MAX_IDENTITY_BYTES:
            raise UsageError(f"{path} is larger than an identity file can be ({MAX_IDENTITY_BYTES} bytes)")
        return PublicIdentity.parse(path.read_bytes())
    if "BEGIN PUBLIC KEY" in source:
        return PublicIdentity.parse(source)
    raise UsageError(f"{source[:60]!r} is neither a file nor a PEM public key")


def _identity_rows(public: PublicIdentity) -> list[tuple[str, str]]:
    return [("age recipient", public.recipient or ""), ("signing key id", f"sha256:{public.key_id}")]


# -- identity -------------------------------------------------------------------------------


@click.group("identity", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the public identity as JSON.")
@click.pass_context
def identity_cmd(ctx: click.Context, as_json: bool) -> None:
    """Show your public sharing identity (created on first use).

    It has two parts, both backed by private keys that stay in the OS keyring: an age recipient
    (age1...) that others encrypt bundles to, and an ECDSA P-256 signing key that proves bundles
    come from you. Hand the output of 'vault identity export' to the people you share with.
    """
    if ctx.invoked_subcommand is not None:
        return
    public = load_identity(Vault().keys, create=True).public
    if as_json:
        print_json({"recipient": public.recipient, "key_id": public.key_id, "signing_key": public.signing_key_pem})
        return
    print_table(["", ""], _identity_rows(public), title="your sharing identity")
    console().print(public.signing_key_pem, markup=False, highlight=False)


@identity_cmd.command("export")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File to write the public identity to (refuses to overwrite).")
def identity_export_cmd(output: Path) -> None:
    """Write your public identity (age recipient + PEM signing key) to a file for others.

    The file holds no secret. Others use it with 'vault trust add NAME FILE' and
    'vault export ... --to FILE'; its PEM block also works as --public_key for the upstream
    'model_signing verify key' tool.
    """
    if output.exists():
        raise UsageError(f"{output} already exists; refusing to overwrite it")
    public = load_identity(Vault().keys, create=True).public
    atomic_write(output, public.to_text().encode("ascii"), mode=0o644)
    console().print(f"Wrote your public identity to [bold]{output}[/] (key sha256:{public.key_id[:16]}…).")


# -- trust ------------------------------------------------------------------------------------


@click.group("trust")
def trust_cmd() -> None:
    """Manage the signers whose bundles you accept.

    The list lives in the vault directory; its digest is anchored in the OS keyring, so a program
    that can write your files but not read your keyring cannot add a signer or restore an old list.
    """


@trust_cmd.command("add")
@click.argument("name")
@click.argument("source", metavar="FILE|KEY")
@click.option("--force", is_flag=True, help="Replace the key of an existing signer of that name.")
def trust_add_cmd(name: str, source: str, force: bool) -> None:
    """Trust the signing key in FILE (from 'vault identity export', or a PEM public key) as NAME.

    KEY may also be the PEM text itself. Check the key id with its owner through another channel.
    """
    identity = _read_identity_source(source)
    vault = Vault()
    signer = TrustStore(vault.home, vault.keys).add(name, identity, force=force)
    console().print(f"Now trusting [bold]{signer.name}[/] (key sha256:{signer.key_id}).", highlight=False)


@trust_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def trust_list_cmd(as_json: bool) -> None:
    """List trusted signers (name, key id, age recipient, when added)."""
    vault = Vault()
    signers = TrustStore(vault.home, vault.keys).list()
    if as_json:
        print_json([s.to_json() for s in signers])
        return
    if not signers:
        console().print("No trusted signers. Add one with: vault trust add NAME FILE")
        return
    print_table(["name", "key id", "recipient", "added"],
                [(s.name, f"sha256:{s.key_id[:16]}…", s.identity.recipient or "", s.added) for s in signers])


@trust_cmd.command("remove")
@click.argument("name")
def trust_remove_cmd(name: str) -> None:
    """Stop trusting signer NAME (bundles already imported stay, with their licence)."""
    vault = Vault()
    TrustStore(vault.home, vault.keys).remove(name)
    console().print(f"No longer trusting [bold]{name}[/].")


# -- export ------------------------------------------------------------------------------------


def _resolve_to(vault: Vault, to: str) -> PublicIdentity | str:
    if to.startswith("age1"):
        return to
    path = Path(to)
    if path.is_file():
        return _read_identity_source(to)
    signers = {s.name: s for s in TrustStore(vault.home, vault.keys).list()}
    if to in signers and signers[to].identity.recipient:
        return signers[to].identity
    raise UsageError(f"--to {to[:60]!r} is not an age1... recipient, an identity file, or a trusted signer with a recipient")


def _read_terms(path: Path) -> dict[str, Any]:
    """--licence FILE: plain terms text, or (for *.json) a template with terms/uses/expires/guard_required."""
    if path.stat().st_size > _MAX_TERMS_FILE:
        raise UsageError(f"{path} is larger than {_MAX_TERMS_FILE} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if path.suffix.lower() != ".json":
        return {"terms": text}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(doc, dict) or set(doc) - _TEMPLATE_KEYS:
        raise UsageError(f"{path}: a licence template is an object with only {sorted(_TEMPLATE_KEYS)}")
    types = {"terms": (str,), "uses": (list,), "expires": (str, type(None)), "guard_required": (bool,)}
    for key, value in doc.items():
        if type(value) not in types[key] or (key == "uses" and not all(isinstance(u, str) for u in value)):
            raise UsageError(f"{path}: '{key}' has the wrong type")
    return doc


def _split_uses(value: str | None) -> set[str]:
    uses = {u.strip() for u in (value or "").split(",") if u.strip()}
    unknown = uses - set(USES)
    if unknown:
        raise UsageError(f"unknown use {sorted(unknown)[0]!r}; choose from {', '.join(USES)}")
    return uses


@click.command("export")
@click.argument("name")
@click.option("--to", "to", required=True, metavar="RECIPIENT|FILE|SIGNER",
              help="The licensee: an age1... recipient, their identity file, or a trusted signer's name.")
@click.option("--licence", "licence_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The terms: a text file, or a .json template {terms, uses, expires, guard_required}.")
@click.option("--expires", help="When the licence ends: 'never', '30d', 2027-01-31 (00:00 UTC) or an ISO-8601 time.")
@click.option("--allow", help=f"Comma-separated uses granted besides chat: {', '.join(u for u in USES if u != 'chat')}.")
@click.option("--guard-optional", is_flag=True, help="Let the licensee run without the guard (default: guard required).")
@click.option("--include-recovery", is_flag=True, help="Also encrypt adapter.age to your vault's recovery key.")
@click.option("--no-fingerprint", is_flag=True, help="Do not embed this licensee's keyed fingerprint in the weights "
              "(default: embed it, so 'vault trace' can tell whose copy leaked).")
@click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The bundle directory to create (must not exist).")
def export_cmd(name: str, to: str, licence_file: Path, expires: str | None, allow: str | None,
               guard_optional: bool, include_recovery: bool, no_fingerprint: bool, output: Path) -> None:
    """Export adapter NAME as a signed, encrypted bundle licensed to one person.

    The bundle (adapter.age, licence.json, README.txt, model.sig) decrypts only for the licensee,
    and its OpenSSF model-signing signature verifies with 'model_signing verify key'. An adapter
    you imported yourself can be re-exported only if its licence permits 'share', and never on
    wider terms than you received.
    """
    vault = Vault()
    template = _read_terms(licence_file)
    uses = {"chat"} | _split_uses(",".join(template.get("uses", []))) | _split_uses(allow)
    expiry_text = expires if expires is not None else template.get("expires")
    expiry = parse_expiry(expiry_text) if expiry_text is not None else None
    guard_required = template.get("guard_required", True) and not guard_optional
    out, licence = export_bundle(
        vault, name, output, to=_resolve_to(vault, to), uses=uses, expires=expiry,
        terms=template.get("terms", ""), guard_required=guard_required, include_recovery=include_recovery,
        fingerprint=not no_fingerprint,
    )
    _print_licence(licence, title=f"exported {name} to {out}")
    rows = [(f, human_size((out / f).stat().st_size)) for f in sorted(p.name for p in out.iterdir())]
    print_table(["file", "size"], rows)


# -- verify / import ----------------------------------------------------------------------------


def _print_licence(licence: Licence, *, title: str, signer: str | None = None) -> None:
    rows = [
        ("adapter", licence.adapter_name),
        ("adapter sha256", licence.adapter_sha256),
        ("base", f"{licence.base_name} {licence.base_sha256 or '(digest not recorded)'}"),
        ("licensed to", licence.licensee_recipient),
        ("licensor key", f"sha256:{licence.licensor_key}"),
        ("permitted", ", ".join(u for u in USES if u in licence.uses)),
        ("issued", format_time(licence.issued)),
        ("expires", format_time(licence.expires) if licence.expires else "never"),
        ("guard", "required" if licence.guard_required else "optional"),
    ]
    if signer:
        rows.insert(0, ("signed by", signer))
    if licence.terms:
        rows.append(("terms", licence.terms))
    print_table(["", ""], rows, title=title)


def _signer_option(vault: Vault, signer: str | None) -> PublicIdentity | None:
    if signer is None:
        return None
    if Path(signer).is_file() or "BEGIN PUBLIC KEY" in signer:
        return _read_identity_source(signer)
    return TrustStore(vault.home, vault.keys).get(signer).identity


@click.command("verify")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--signer", metavar="NAME|FILE", help="Check against this signer (a trusted name or a key file) "
              "instead of any trusted signer.")
@click.option("--json", "as_json", is_flag=True, help="Print the verified bundle as JSON.")
def verify_cmd(directory: Path, signer: str | None, as_json: bool) -> None:
    """Check a bundle WITHOUT decrypting it.

    Checks: exactly the four bundle files; the model-signing signature over all of them by a signer
    you trust (or --signer); the licence schema; that the licence names that signer, is addressed to
    your age recipient, and has not expired. Exits non-zero with the reason on the first failure.
    """
    vault = Vault()
    me = load_identity(vault.keys, create=False).public
    explicit = _signer_option(vault, signer)
    trusted = [] if explicit is not None else TrustStore(vault.home, vault.keys).list()
    verified = verify_bundle(directory, my_recipient=me.recipient, trusted=trusted, signer=explicit)
    if as_json:
        print_json(verified.to_json())
        return
    who = verified.signer_name or signer or ""
    _print_licence(verified.licence, title=f"bundle OK: {directory}",
                   signer=f"{who} (sha256:{verified.signer_key_id[:16]}…)")
    print_table(["file", "size", "sha256"],
                [(n, human_size(f["size"]), f["sha256"]) for n, f in verified.files.items()])


@click.command("import")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", help="Store under this name (default: the adapter name in the licence).")
def import_cmd(directory: Path, name: str | None) -> None:
    """Import a bundle addressed to you from a trusted signer, with its licence attached.

    Everything 'vault verify' checks, then the adapter is decrypted in memory and its digest and base
    compared with the licence before it is sealed into your vault. Anything else is refused and
    nothing is stored. The licence is enforced from then on: see 'vault show NAME'.
    """
    vault = Vault()
    entry = import_bundle(vault, directory, name=name)
    _print_licence(Licence.from_dict(entry.licence), title=f"imported as {entry.name}")
    err_console().print("The licence travels with the adapter: its uses and expiry are enforced at every load.")


@click.command("trace")
@click.argument("name")
@click.argument("suspect", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def trace_cmd(name: str, suspect: Path, as_json: bool) -> None:
    """Tell which licensee a leaked copy of your adapter NAME came from.

    SUSPECT is the leaked adapter (PEFT directory or GGUF LoRA). Every bundle exported from NAME
    carries a keyed fingerprint for its licensee; this scores SUSPECT against each of them. A z-score
    of 8 or more is a match (chance: below 1e-15); unrelated licences score about 0. Averaging copies,
    heavy noise or retraining weaken the signal: a match is evidence, no match proves nothing.
    """
    from vault.fingerprint import MATCH_Z, trace

    results = trace(Vault(), name, suspect)
    if as_json:
        print_json([t.to_json() for t in results])
        return
    if not results:
        console().print(f"No fingerprinted exports of {name} are recorded in this vault.", markup=False)
        return
    print_table(["licensee", "licence id", "issued", "z", "match"],
                [(t.licensee, t.licence_id, t.issued, f"{t.z:.1f}", "YES" if t.match else "") for t in results],
                title=f"fingerprint trace of {suspect} (match: z >= {MATCH_Z:g})")


COMMANDS = [identity_cmd, trust_cmd, export_cmd, verify_cmd, import_cmd, trace_cmd]
