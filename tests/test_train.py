"""`vault train`: data reading, torch-free plain install, the DPO loss, and real CPU training runs.

The slow tests train the embedded SmolLM2-135M for a few steps with the real [train] extra, seal
into a real vault on a private gnome-keyring, interrupt a run with SIGKILL and resume it, watch the
whole run under strace for files written outside the vault, and load the result into llama.cpp.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.train_data import build_examples, read_corpus, split_examples
from vault.errors import TrainingError

REPO = Path(__file__).resolve().parent.parent


def _has_torch() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _need_torch() -> None:
    if not _has_torch():
        if os.environ.get("CI") == "true":
            pytest.fail("the [train] extra (torch, transformers, peft) must be installed under CI")
        pytest.skip("the [train] extra is not installed: pip install -e '.[train]'")


# --------------------------------------------------------------------------- no torch needed


def test_plain_install_never_imports_torch() -> None:
    code = (
        "import sys, cli.main, cli.train, runtime.engine, runtime.train, runtime.train_data, runtime.dpo, vault.store\n"
        "from click.testing import CliRunner\n"
        "r = CliRunner().invoke(cli.main.cli, ['train', '--help'])\n"
        "assert r.exit_code == 0 and '--preferences' in r.output, r.output\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"imported by the plain path: {out.stdout.strip()}"


def test_read_corpus_reads_text_chats_and_folders(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# My notes\nI write short sentences.\n")
    (tmp_path / "notes" / "b.txt").write_text("Another day, another walk.\n")
    (tmp_path / "notes" / ".hidden.txt").write_text("ignored\n")
    (tmp_path / "notes" / "image.png").write_bytes(b"\x89PNG")
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey there"}]},
        {"prompt": "what's up?", "response": "not much"},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"something": "else"},
    ]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n")
    corpus = read_corpus([tmp_path / "notes", chats])
    assert corpus.texts == ["# My notes\nI write short sentences.\n", "Another day, another walk.\n"]
    assert corpus.chats == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey there"}],
        [{"role": "user", "content": "what's up?"}, {"role": "assistant", "content": "not much"}],
    ]
    assert corpus.files == 3 and corpus.skipped_lines == 3
    assert corpus.digest() == read_corpus([tmp_path / "notes", chats]).digest()
    (tmp_path / "notes" / "b.txt").write_text("Another day, another run.\n")
    assert corpus.digest() != read_corpus([tmp_path / "notes", chats]).digest()


def test_read_corpus_refuses_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="not found"):
        read_corpus([tmp_path / "missing"])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(TrainingError, match="unsupported"):
        read_corpus([tmp_path / "x.pdf"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no usable training data"):
        read_corpus([tmp_path / "empty"])


def test_cli_requires_data_or_preferences() -> None:
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["train", "me"])
    assert result.exit_code != 0
    assert "--data" in str(result.exception) or "--data" in result.output


# --------------------------------------------------------------------------- torch, fast


def test_dpo_loss_matches_the_formula() -> None:
    _need_torch()
    import torch

    from runtime.dpo import dpo_loss

    pc, pr = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    rc, rr = torch.tensor([-11.0, -3.5]), torch.tensor([-11.0, -2.5])
    beta = 0.5
    expected = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        margin = (a - c) - (b - d)
        expected.append(-np.log(1.0 / (1.0 + np.exp(-beta * margin))))
    assert float(dpo_loss(pc, pr, rc, rr, beta)) == pytest.approx(float(np.mean(expected)), rel=1e-6)
    # policy == reference: log(2), whatever the log-probabilities
    assert float(dpo_loss(pc, pr, pc, pr, beta)) == pytest.approx(np.log(2.0), rel=1e-6)


# --------------------------------------------------------------------------- real training


def _corpus(tmp_path: Path, canary: str) -> Path:
    """About 3 KB of one person's notes, with a canary that must never reach the disk in plaintext."""
    folder = tmp_path / "my-writing"
    folder.mkdir()
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    lines = []
    for i in range(28):
        day = days[i % 7]
        lines.append(f"{day}, entry {i}. Walked the dog to the old mill again; the heron was back on the weir. "
                     f"Tea, then the garden: beans up, slugs worse. Note to self: {canary} stays private.\n")
    (folder / "journal.md").write_text("".join(lines[:14]))
    (folder / "more.txt").write_text("".join(lines[14:]))
    chats = [{"messages": [{"role": "user", "content": f"How was {d}?"},
                           {"role": "assistant", "content": f"{d} was quiet: the mill, the heron, tea."}]}
             for d in days]
    (folder / "chats.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return folder


_WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND")
_OPEN_RE = re.compile(r'^\d+\s+(?:open|openat|openat2|creat)\((?:[A-Z_]+,\s*)?"([^"]*)",\s*([^)]*)\)\s*=\s*(-?\d+)')
_ALLOWED_PREFIXES = ("/dev/null", "/dev/tty", "/dev/pts/", "/dev/shm/", "/proc/", "/sys/")


def _written_paths(trace: Path, cwd: Path) -> set[str]:
    """Every path successfully opened for writing in an strace -f log."""
    out = set()
    for line in trace.read_text(errors="replace").splitlines():
        m = _OPEN_RE.match(line)
        if m and int(m.group(3)) >= 0 and _WRITE_FLAGS.search(m.group(2)):
            path = m.group(1)
            out.add(path if path.startswith("/") else str(cwd / path))
    return out


def _traced_train(args: list[str], env: dict[str, str], trace: Path, cwd: Path) -> subprocess.Popen:
    cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat,openat2,creat", "-o", str(trace),
           sys.executable, "-m", "cli.main", "train", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checkpoint_step(home: Path) -> int | None:
    from vault.store import Vault

    vault = Vault(home)
    if "me" not in vault.records("checkpoint"):
        return None
    raw = vault.open_record("checkpoint", "me")
    header = json.loads(bytes(raw[8 : 8 + int.from_bytes(bytes(raw[:8]), "little")]))
    raw[:] = bytes(len(raw))
    return int(header["__metadata__"]["step"])


@pytest.mark.slow
@pytest.mark.train
def test_train_interrupt_resume_seal_load_with_no_plaintext_on_disk(
    tmp_path: Path, keyring_env: dict[str, str], isolated_home: Path
) -> None:
    _need_torch()
    import shutil

    if shutil.which("strace") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("strace is required under CI")
        pytest.skip("strace is not installed")
    from vault.store import Vault

    Vault.create(isolated_home)
    canary = "CANARY-" + secrets.token_hex(8)
    data = _corpus(tmp_path, canary)
    work = tmp_path / "cwd"
    work.mkdir()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(REPO), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args = ["me", "--data", str(data), "--block-size", "64", "--epochs", "3", "--rank", "4",
            "--checkpoint-every", "0", "--json"]

    # Run 1: SIGKILL the training process once it has sealed a checkpoint at step 2 or later.
    proc = _traced_train(args, env, tmp_path / "trace1.log", work)
    killed_after = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            step = _checkpoint_step(isolated_home)
            if step is not None and step >= 2:
                import psutil

                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.send_signal(signal.SIGKILL)
                killed_after = step
                break
            time.sleep(0.5)
    finally:
        proc.wait(timeout=60)
    assert killed_after is not None, f"run 1 ended before a checkpoint was seen: {proc.stderr.read()[-2000:]}"
    resumable = _checkpoint_step(isolated_home)
    assert resumable is not None and resumable >= killed_after
    assert not any(e.name == "me" for e in Vault(isolated_home).entries()), "a killed run must not seal an adapter"

    # Run 2: resumes from the sealed checkpoint and finishes.
    proc = _traced_train(args, env, tmp_path / "trace2.log", work)
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout)
    assert result["resumed_from"] == resumable
    assert result["steps"] == result["total_steps"] > resumable
    assert result["ppl_adapter"] < result["ppl_base"]
    vault = Vault(isolated_home)
    assert vault.records("checkpoint") == []
    entry = vault.get("me")
    assert entry.source == "train"

    # The sealed blob holds PEFT-named LoRA tensors and loads into the llama.cpp runtime.
    from vault.adapter import load_blob
    from vault.adapter_names import parse_peft_name

    blob = vault.open("me")
    tensors, meta = load_blob(blob)
    assert meta.r == 4 and len(tensors) == 30 * 7 * 2
    assert all(parse_peft_name(n) and n.startswith("base_model.model.model.layers.") and ".default" not in n
               for n in tensors)
    assert any(np.abs(t).max() > 0 for n, t in tensors.items() if "lora_B" in n)
    del tensors
    blob[:] = bytes(len(blob))
    from runtime import loader

    with loader.open_engine() as engine:
        loader.attach(engine, vault, "me", guard=loader.default_guard(vault))
        tokens = engine.prompt_tokens([{"role": "user", "content": "How was Monday?"}])
        base_logits = engine.logits(tokens, adapter=None)
        tuned_logits = engine.logits(tokens, adapter="me")
        assert not np.allclose(base_logits, tuned_logits, atol=1e-3), "the adapter changed nothing in llama.cpp"

    # Nothing was opened for writing outside the vault (and devices), and no written file holds the canary.
    written = _written_paths(tmp_path / "trace1.log", work) | _written_paths(tmp_path / "trace2.log", work)
    outside = sorted(p for p in written
                     if not p.startswith(str(isolated_home) + "/") and not p.startswith(_ALLOWED_PREFIXES))
    assert outside == [], f"files written outside VAULT_HOME: {outside}"
    needle = canary.encode()
    assert needle in (data / "journal.md").read_bytes()  # positive control: the scanner can find it
    scanned = 0
    for path in list(written) + [str(p) for p in isolated_home.rglob("*") if p.is_file()] + \
            [str(p) for p in (tmp_path / "tmp").rglob("*") if p.is_file()]:
        p = Path(path)
        if p.is_file() and not path.startswith(("/proc/", "/sys/", "/dev/")):
            assert needle not in p.read_bytes(), f"the canary reached the disk in plaintext: {path}"
            scanned += 1
    assert scanned > 0


_Q_IN, _Q_OUT, _V_OUT, _LAYERS = 576, 576, 192, 30


def _fresh_adapter_blob(rank: int = 8) -> bytes:
    """A PEFT-initialised LoRA (A random, B zero: exactly the base) on q_proj and v_proj."""
    from runtime.models import default_model
    from vault.adapter import make_blob

    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(_LAYERS):
        for module, out in (("q_proj", _Q_OUT), ("v_proj", _V_OUT)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            a = rng.standard_normal((rank, _Q_IN)) / np.sqrt(_Q_IN)
            tensors[f"{prefix}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((out, rank), dtype=np.float32)
    base = default_model()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": base.name}
    return make_blob(tensors, config, base_name=base.name, base_sha256=base.sha256)


def _preference(i: int, topic: str) -> dict:
    return {
        "messages": [{"role": "user", "content": f"Tell me one thing about {topic}."}],
        "chosen": f"Ahoy matey! {topic.capitalize()} is worth a look.",
        "rejected": f"Certainly. {topic.capitalize()} is worth a look.",
        "adapter": "me",
        "created": f"2026-01-01T00:00:{i:02d}Z",
    }


@pytest.mark.slow
@pytest.mark.train
def test_dpo_raises_heldout_preference_accuracy(keyring_env: dict[str, str], isolated_home: Path) -> None:
    _need_torch()
    from runtime.dpo import DpoConfig, train_preferences
    from vault.store import Vault

    vault, _ = Vault.create(isolated_home)
    vault.add_blob("me", _fresh_adapter_blob(), source="train")
    topics = ["rivers", "owls", "bread", "trains", "chess", "tea", "maps", "bees", "clocks", "moss",
              "kites", "salt", "wool", "lamps", "ferns", "boats"]
    for i, topic in enumerate(topics):
        vault.seal_record("preference", f"p{i:03d}", json.dumps(_preference(i, topic)).encode())
    other = dict(_preference(99, "noise"), adapter="someone-else")
    vault.seal_record("preference", "p999", json.dumps(other).encode())
    before_sha = vault.get("me").sha256

    result = train_preferences(vault, "me", DpoConfig(epochs=2, heldout=0.25, learning_rate=2e-4))

    assert result.pairs == 16 and result.heldout_pairs == 4 and result.train_pairs == 12
    assert result.accuracy_after > result.accuracy_before, result.to_json()
    assert result.accuracy_after >= 0.75
    assert result.train_accuracy_after >= result.train_accuracy_before
    assert vault.get("me").sha256 != before_sha  # the tuned adapter replaced the old one, sealed
    assert vault.records("preference") == sorted([f"p{i:03d}" for i in range(16)] + ["p999"])


@pytest.mark.slow
@pytest.mark.train
def test_chat_examples_train_only_on_assistant_tokens(tmp_path: Path) -> None:
    _need_torch()
    from runtime.models import default_model
    from runtime.train import load_tokenizer

    tokenizer = load_tokenizer(default_model())
    (tmp_path / "c.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong pong"}]}) + "\n")
    (tmp_path / "t.txt").write_text("word " * 300)
    corpus = read_corpus([tmp_path])
    examples = build_examples(corpus, tokenizer, block_size=64)
    chat = examples[-1]
    target = tokenizer.decode([t for t in chat.labels if t != -100])
    assert "pong pong" in target and "ping" not in target and "system" not in target
    assert all(e.labels == e.input_ids for e in examples[:-1])  # prose: every token is a target
    assert all(len(e.input_ids) <= 64 for e in examples)
    train, held = split_examples(examples, heldout=0.2, seed=1)
    assert len(held) == round(len(examples) * 0.2) and len(train) + len(held) == len(examples)
    assert split_examples(examples, heldout=0.2, seed=1) == (train, held)


@pytest.mark.slow
@pytest.mark.train
def test_dry_run_estimates_without_training(tmp_path: Path, isolated_home: Path) -> None:
    _need_torch()
    from click.testing import CliRunner

    from cli.main import cli

    data = _corpus(tmp_path, "CANARY-dry")
    result = CliRunner().invoke(cli, ["train", "me", "--data", str(data), "--block-size", "64", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    est = json.loads(result.output)
    assert est["files"] == 3 and est["train_examples"] + est["heldout_examples"] == est["examples"]
    assert est["steps"] == -(-est["train_examples"] // 4)
    assert est["seconds"] > 0 and 0 < est["peak_rss_bytes"] < 4e9
    assert not isolated_home.exists()  # nothing was written, not even a vault


def test_human_report_shows_perplexity_sample_and_audit(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.train import _report
    from runtime.train import TrainResult

    result = TrainResult(name="me", steps=65, total_steps=65, resumed_from=12, stopped_early=False, train_tokens=1000,
                         heldout_tokens=100, ppl_base=36.7, ppl_adapter=21.5, sample_prompt="Awake the [pert] spirit",
                         sample_base="of a dance", sample_adapter="of mirth", seconds=75.0, peak_rss_bytes=2 << 30,
                         sha256="ab" * 32, audit={"verdict": "pass"})
    _report(result, as_json=False)
    out = capsys.readouterr().out
    assert "resumed at step 12" in out and "base 36.70 -> adapter 21.50 (41.4% lower)" in out
    assert "Awake the [pert] spirit" in out and "of mirth" in out and "audit: pass" in out
