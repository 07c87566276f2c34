"""The store commands end to end: a real `vault` process, a real Secret Service, exit codes and output."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_adapters import make_gguf_lora, make_peft_adapter
from vault import age
from vault.errors import (
    IntegrityError,
    InvalidAdapterError,
    KeyringMissingError,
    NoIdentityError,
    NotInitializedError,
    UnknownNameError,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each command is a fresh interpreter (~0.8 s)


def vault_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    run_env = dict(os.environ if env is None else env)
    run_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], input=stdin, capture_output=True, text=True,
        env=run_env, cwd=REPO, timeout=90,
    )


def _recovery_key(stdout: str) -> str:
    return next(w for w in stdout.replace("│", " ").split() if w.startswith("AGE-SECRET-KEY-1"))


def _assert_one_line_error(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("vault: error: ") and result.stderr.count("\n") == 1


def test_init_add_list_show_remove(keyring_env, isolated_home: Path, tmp_path: Path) -> None:
    init = vault_cli("init")
    assert init.returncode == 0, init.stderr
    assert "write this down" in init.stdout.lower() and "shown once" in init.stdout
    recovery = _recovery_key(init.stdout)
    _assert_one_line_error(vault_cli("init"), 5)

    added = vault_cli("add", "my-voice", str(make_peft_adapter(tmp_path / "a")))
    assert added.returncode == 0, added.stderr
    assert "Sealed my-voice" in added.stdout
    gguf = vault_cli("add", "from-gguf", str(make_gguf_lora(tmp_path / "b.gguf", r=4)))
    assert gguf.returncode == 0, gguf.stderr

    listed = json.loads(vault_cli("list", "--json").stdout)
    assert [e["name"] for e in listed] == ["from-gguf", "my-voice"]
    assert all(e["base_name"] == "SmolLM2-135M-Instruct" and len(e["base_sha256"]) == 64 for e in listed)
    table = vault_cli("list").stdout
    assert "my-voice" in table and "not audited" in table

    shown = json.loads(vault_cli("show", "my-voice", "--json").stdout)
    assert shown["r"] == 8 and Path(shown["sealed_file"]).is_file()
    key_file = tmp_path / "k"
    key_file.write_text(recovery)
    plain = subprocess.run(["age", "-d", "-i", str(key_file), shown["sealed_file"]], capture_output=True, check=True)
    assert len(plain.stdout) == shown["size"]

    _assert_one_line_error(vault_cli("show", "nope"), UnknownNameError.exit_code)
    declined = vault_cli("remove", "my-voice", stdin="n\n")
    assert declined.returncode == 130
    assert vault_cli("remove", "my-voice", "--yes").returncode == 0
    assert [e["name"] for e in json.loads(vault_cli("list", "--json").stdout)] == ["from-gguf"]


def test_add_errors_are_one_line_with_their_exit_codes(keyring_env, tmp_path: Path) -> None:
    assert vault_cli("init").returncode == 0
    bad = make_peft_adapter(tmp_path / "bad", layers=range(2), config_overrides={"r": 4})
    _assert_one_line_error(vault_cli("add", "x", str(bad)), InvalidAdapterError.exit_code)
    nobase = make_peft_adapter(tmp_path / "nobase", layers=range(2), base=None)
    _assert_one_line_error(vault_cli("add", "x", str(nobase)), 2)
    unknown_base = make_peft_adapter(tmp_path / "llama", layers=range(2), base="meta-llama/Llama-3-8B")
    _assert_one_line_error(vault_cli("add", "x", str(unknown_base)), 13)
    ok = vault_cli("add", "x", str(nobase), "--base", "SmolLM2-135M-Instruct")
    assert ok.returncode == 0, ok.stderr


def test_remove_source_warns_honestly(keyring_env, tmp_path: Path) -> None:
    assert vault_cli("init").returncode == 0
    source = make_peft_adapter(tmp_path / "plain", layers=range(2))
    result = vault_cli("add", "a", str(source), "--remove-source")
    assert result.returncode == 0, result.stderr
    assert "copy-on-write" in result.stderr and "SSD" in result.stderr
    assert not source.exists()


def test_tampered_index_exits_with_integrity_code(keyring_env, isolated_home: Path, tmp_path: Path) -> None:
    assert vault_cli("init").returncode == 0
    assert vault_cli("add", "a", str(make_peft_adapter(tmp_path / "a", layers=range(2)))).returncode == 0
    index = isolated_home / "index.age"
    data = bytearray(index.read_bytes())
    data[-1] ^= 1
    index.write_bytes(bytes(data))
    _assert_one_line_error(vault_cli("list"), IntegrityError.exit_code)
    doctor = vault_cli("doctor", "--json")
    assert doctor.returncode == 1
    assert {c["name"]: c["status"] for c in json.loads(doctor.stdout)}["index"] == "fail"
    debug = vault_cli("--debug", "list")
    assert "Traceback" in debug.stderr  # only with --debug


def test_no_keyring_and_no_vault(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    result = vault_cli("init", env=env)
    _assert_one_line_error(result, KeyringMissingError.exit_code)
    assert "dbus-run-session" in result.stderr
    assert not (Path(env["VAULT_HOME"]) / "config.json").exists()
    _assert_one_line_error(vault_cli("list", env=env), NotInitializedError.exit_code)


def test_recovery_file_rotate_doctor_and_recover(keyring_env, make_user, isolated_home: Path, tmp_path: Path) -> None:
    env = dict(os.environ, VAULT_RECOVERY_PASSPHRASE="correct horse battery staple")
    recovery_file = tmp_path / "recovery.age"
    init = vault_cli("init", "--recovery-file", str(recovery_file), env=env)
    assert init.returncode == 0, init.stderr
    assert "AGE-SECRET-KEY" not in init.stdout
    assert stat.S_IMODE(recovery_file.stat().st_mode) == 0o600
    assert recovery_file.read_text().startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    recovery = bytes(age.decrypt(recovery_file.read_bytes(), [age.ScryptIdentity(b"correct horse battery staple")]))
    assert recovery.startswith(b"AGE-SECRET-KEY-1")
    assert vault_cli("add", "a", str(make_peft_adapter(tmp_path / "a", layers=range(2)))).returncode == 0

    rotated = vault_cli("rotate")
    assert rotated.returncode == 0, rotated.stderr
    doctor = vault_cli("doctor", "--json")
    assert doctor.returncode == 0 and all(c["status"] == "ok" for c in json.loads(doctor.stdout))

    new_machine = make_user("new-machine")
    restored = new_machine.home
    subprocess.run(["cp", "-a", str(isolated_home), str(restored)], check=True)
    _assert_one_line_error(vault_cli("list", env=new_machine.env), NoIdentityError.exit_code)
    wrong = vault_cli("recover", "--recovery-file", str(recovery_file),
                      env=dict(new_machine.env, VAULT_RECOVERY_PASSPHRASE="wrong"))
    _assert_one_line_error(wrong, NoIdentityError.exit_code)
    assert "wrong passphrase" in wrong.stderr
    by_stdin = vault_cli("recover", env=new_machine.env, stdin=recovery.decode())
    assert by_stdin.returncode == 0, by_stdin.stderr
    assert [e["name"] for e in json.loads(vault_cli("list", "--json", env=new_machine.env).stdout)] == ["a"]
    # recover is re-runnable: again, from the passphrase-encrypted file (one keyring: fewer private buses)
    recovered = vault_cli("recover", "--recovery-file", str(recovery_file),
                          env=dict(new_machine.env, VAULT_RECOVERY_PASSPHRASE="correct horse battery staple"))
    assert recovered.returncode == 0, recovered.stderr
    assert vault_cli("doctor", env=new_machine.env).returncode == 0
