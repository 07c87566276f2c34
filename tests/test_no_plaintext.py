"""No plaintext adapter ever reaches a file: `vault run` under strace, and a canary scan of the disk.

1. strace -f records every open/creat/rename/link of `vault run NAME "prompt"`; any file opened for
   writing outside VAULT_HOME (the vault's own state: lock, digest cache) fails the test. Python's
   bytecode cache (``__pycache__/*.pyc``) and terminal/null devices are the only other writes allowed.
   The trace must also show the memfd the adapter travels through, so the test cannot pass by not
   loading the adapter at all.
2. The adapter is seeded with a random 16-byte canary; after the run, every regular file under /tmp,
   /var/tmp, /dev/shm, HOME, VAULT_HOME and the working directory is scanned for it. A positive control
   first proves the scanner finds the canary in the plaintext source, which is then deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_adapters import lora_tensors, make_peft_adapter

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")
_SCAN_LIMIT = 512 << 20


def _canary_adapter(directory: Path, seed: int) -> tuple[Path, bytes]:
    rng = np.random.default_rng(seed)
    pattern = rng.uniform(-0.05, 0.05, 4).astype(np.float32)
    canary = pattern.tobytes()
    tensors = lora_tensors(r=8, targets=("q_proj", "v_proj"), seed=seed, scale=0.05)
    for name in tensors:  # every lora_A of v_proj is the canary tiled: it survives the GGUF conversion verbatim
        if "v_proj.lora_A" in name:
            tensors[name] = np.resize(pattern, tensors[name].shape).astype(np.float32)
    return make_peft_adapter(directory, r=8, targets=("q_proj", "v_proj"), tensors=tensors), canary


@pytest.fixture
def sealed_canary(keyring_env, tmp_path: Path):
    from runtime.models import default_model
    from vault.store import Vault

    vault = Vault.create()[0]
    base = default_model()
    source, canary = _canary_adapter(tmp_path / "canary-src", int.from_bytes(os.urandom(4), "little"))
    vault.add("canary", source, base_name=base.name, base_sha256=base.sha256)
    return vault, source, canary


def _run_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _writes(trace: str, vault_home: Path) -> tuple[list[str], list[str]]:
    """(offending write lines, memfd_create lines) from an ``strace -f -y`` log."""
    home = str(vault_home.resolve())
    bad, memfds = [], []
    for line in trace.splitlines():
        if "memfd_create(" in line:
            memfds.append(line)
            continue
        call = re.search(r"\b(open|openat|openat2|creat|rename|renameat2?|link|linkat)\(", line)
        if not call or re.search(r"= -1 ", line):
            continue
        if call.group(1) in ("open", "openat", "openat2") and not any(f in line for f in _WRITE_FLAGS):
            continue
        resolved = re.search(r"= \d+<([^>]*)>", line)
        paths = [resolved.group(1)] if resolved else re.findall(r'"([^"]*)"', line)
        for path in paths:
            allowed = (path.startswith(home + "/") or path == home or path in ("/dev/null", "/dev/tty")
                       or path.startswith("/dev/pts/") or re.search(r"/__pycache__/[^/]+\.pyc(\.\d+)?$", path))
            if not allowed:
                bad.append(line)
    return bad, memfds


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_vault_run_opens_nothing_for_writing_outside_vault_home(sealed_canary, tmp_path: Path,
                                                                isolated_home: Path) -> None:
    log = tmp_path / "strace.log"
    calls = "open,openat,openat2,creat,rename,renameat,renameat2,link,linkat,memfd_create"
    out = subprocess.run(
        ["strace", "-f", "-y", "-qq", "-o", str(log), "-e", f"trace={calls}",
         sys.executable, "-m", "cli.main", "run", "canary", "Say hi.", "--max-tokens", "8"],
        capture_output=True, text=True, env=_run_env(), cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "adapter canary loaded from memory" in out.stderr
    bad, memfds = _writes(log.read_text(), isolated_home)
    assert any('"vault-adapter"' in m and "MFD_CLOEXEC|MFD_ALLOW_SEALING" in m for m in memfds), memfds
    assert bad == [], "files opened for writing outside VAULT_HOME:\n" + "\n".join(bad)


def _scan(roots: list[Path], needle: bytes) -> list[str]:
    hits: list[str] = []
    seen: set[tuple[int, int]] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for filename in filenames:
                path = os.path.join(dirpath, filename)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > _SCAN_LIMIT or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                try:
                    with open(path, "rb") as fh:
                        tail = b""
                        while chunk := fh.read(1 << 20):
                            if needle in tail + chunk:
                                hits.append(path)
                                break
                            tail = chunk[-(len(needle) - 1):]
                except OSError:
                    continue
    return hits


def test_canary_never_reaches_the_disk(sealed_canary, tmp_path: Path, isolated_home: Path) -> None:
    vault, source, canary = sealed_canary
    roots = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path.home(), isolated_home, tmp_path]
    # positive control: the scanner finds the canary in the plaintext source ...
    assert str(source / "adapter_model.safetensors") in _scan([source], canary)
    shutil.rmtree(source)  # ... which is then gone, so any later hit is a leak
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    out = subprocess.run([sys.executable, "-m", "cli.main", "run", "canary", "Say hi.", "--max-tokens", "8"],
                         capture_output=True, env=_run_env(), cwd=workdir, timeout=600)
    assert out.returncode == 0, out.stderr
    assert b"adapter canary loaded from memory" in out.stderr
    assert canary in bytes(vault.open("canary"))  # the sealed adapter really carries the canary
    assert _scan(roots + [workdir, REPO], canary) == []
