"""`vault run` and `vault models`, end to end: real vault, real keyring, real llama.cpp, real CLI process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures_adapters import make_peft_adapter

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def vault_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          input=input, timeout=600, cwd=REPO)


@pytest.fixture
def sealed(keyring_env, tmp_path: Path):
    """A vault with adapter 'mine' sealed for the embedded base, and 'foreign' sealed for another base."""
    from runtime.models import default_model
    from vault.store import Vault

    vault = Vault.create()[0]
    base = default_model()
    vault.add("mine", make_peft_adapter(tmp_path / "mine", scale=0.3), base_name=base.name, base_sha256=base.sha256)
    vault.add("foreign", make_peft_adapter(tmp_path / "foreign"), base_name="other", base_sha256="cd" * 32)
    return vault


def test_one_shot_json_with_sealed_adapter(sealed) -> None:
    out = vault_cli("run", "mine", "Say hi.", "--json", "--max-tokens", "8", "--temperature", "0")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["adapter"] == "mine" and result["base"] == "SmolLM2-135M-Instruct"
    assert result["finish_reason"] in ("stop", "length") and result["text"]
    assert 0 < result["usage"]["completion_tokens"] <= 8 and result["usage"]["prompt_tokens"] > 10


def test_one_shot_plain_pipes_to_stdout(sealed) -> None:
    out = vault_cli("run", "mine", "Say hi.", "--max-tokens", "8", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "loading" not in out.stdout  # status lines go to stderr only
    assert "adapter mine loaded from memory" in out.stderr


def test_base_model_without_a_vault(isolated_home: Path) -> None:
    out = vault_cli("run", "-", "Say hi.", "--json", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["adapter"] is None
    assert not (isolated_home / "config.json").exists()  # running the bare base needs no vault


def test_foreign_base_and_unknown_name_are_refused(sealed) -> None:
    out = vault_cli("run", "foreign", "hi", "--max-tokens", "4")
    assert out.returncode == 13 and "sealed for base" in out.stderr and not out.stdout.strip()
    out = vault_cli("run", "nosuch", "hi", "--max-tokens", "4")
    assert out.returncode == 8


def test_help_states_the_guard_status() -> None:
    out = vault_cli("run", "--help")
    from runtime.loader import guard_is_passthrough

    assert out.returncode == 0
    assert ("pass-through" in out.stdout) == guard_is_passthrough()
    assert "/prefer" in out.stdout and "memfd" in out.stdout


def test_models_list_and_add(tmp_path: Path) -> None:
    from runtime.models import default_model

    out = vault_cli("models", "--json")
    rows = json.loads(out.stdout)
    assert rows[0]["name"] == "SmolLM2-135M-Instruct" and rows[0]["fits"] is True
    assert rows[0]["n_ctx"] >= 512 and rows[0]["n_threads"] >= 1 and rows[0]["size"] == default_model().size
    link = tmp_path / "my-model.gguf"
    link.symlink_to(default_model().path)
    out = vault_cli("models", "add", str(link), "--name", "mine-base", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sha256"] == default_model().sha256
    assert [r["name"] for r in json.loads(vault_cli("models", "--json").stdout)] == ["SmolLM2-135M-Instruct",
                                                                                      "mine-base"]
    assert vault_cli("models", "add", str(link), "--name", "mine-base").returncode == 2  # taken without --force
    out = vault_cli("run", "-", "hi", "--base", "mine-base", "--json", "--max-tokens", "2")
    assert out.returncode == 0, out.stderr
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a model")
    assert vault_cli("models", "add", str(not_gguf)).returncode == 13


def test_interactive_commands_seal_transcript_and_preferences(sealed) -> None:
    from cli.main import cli
    from vault.store import Vault

    script = "\n".join([
        "Say hi.", "/system Answer briefly.", "/good", "/bad", "/prefer Hello there, friend!",
        "/save chat1", "/adapter -", "Say hi.", "/adapter nosuch", "/reset", "/quit", "",
    ])
    result = CliRunner().invoke(cli, ["run", "mine", "--max-tokens", "12", "--seed", "1", "-q"], input=script)
    assert result.exit_code == 0, result.output
    assert "model>" in result.output and "transcript sealed as chat1" in result.output
    vault = Vault()
    transcript = json.loads(bytes(vault.open_record("transcript", "chat1")))
    assert transcript["adapter"] == "mine" and transcript["messages"][0] == {"role": "system",
                                                                            "content": "Answer briefly."}
    assert [m["role"] for m in transcript["messages"]][1:] == ["user", "assistant"]
    prefs = [json.loads(bytes(vault.open_record("preference", n))) for n in vault.records("preference")]
    assert len(prefs) == 3
    assert {(p["chosen"] is None, p["rejected"] is None) for p in prefs} == {(False, True), (True, False),
                                                                              (False, False)}
    prefer = next(p for p in prefs if p["chosen"] == "Hello there, friend!")
    assert prefer["rejected"] == transcript["messages"][-1]["content"] and prefer["adapter"] == "mine"
    assert prefer["messages"][-1] == {"role": "user", "content": "Say hi."} and prefer["created"]
    assert set(prefer) == {"messages", "chosen", "rejected", "adapter", "created"}
