"""The llama.cpp engine, the guarded chat path and the memory-only loader, on the real embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_adapters import make_peft_adapter
from runtime.chat import REFUSAL, Chat, complete, respond
from runtime.guard.base import AuditReport, PassThroughGuard, Verdict
from runtime.memfd import MemFile, zero
from vault.errors import AuditRejectedError, BaseModelError, EngineError

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def engine():
    from runtime.engine import Engine
    from runtime.models import default_model

    with Engine(default_model(), n_ctx=1024) as eng:
        yield eng


@pytest.fixture
def vault(keyring_env):
    from vault.store import Vault

    return Vault.create()[0]


def _seal(vault, tmp_path: Path, name: str, *, base_sha256: str | None = None, scale: float = 0.3, seed: int = 0):
    from runtime.models import default_model

    base = default_model()
    directory = make_peft_adapter(tmp_path / name, r=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                                  scale=scale, seed=seed)
    return vault.add(name, directory, base_name=base.name, base_sha256=base_sha256 or base.sha256)


class _Spy:
    """Wraps a vault; keeps the plaintext buffers it hands out so the test can check they were zeroed."""

    def __init__(self, vault) -> None:
        self.vault, self.opened = vault, []

    def open(self, name: str) -> bytearray:
        buf = self.vault.open(name)
        self.opened.append(buf)
        return buf

    def get(self, name: str):  # attach() reads the entry first (licence enforcement)
        return self.vault.get(name)


def _memfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
        except OSError:  # the directory listing's own descriptor is gone by now
            pass
    return count


# -- engine ---------------------------------------------------------------------------------------


def test_stop_on_eos_and_max_tokens(engine) -> None:
    text, finish = engine.generate(HI, max_tokens=200, temperature=0)
    assert finish == "stop" and text.strip()
    pieces = list(engine.stream(HI, max_tokens=3, temperature=0))
    assert pieces[-1].finish_reason == "length" and pieces[-1].completion_tokens == 3
    assert all(p.finish_reason is None for p in pieces[:-1])
    # greedy decoding is deterministic, and the streamed text is the same as the whole
    assert engine.generate(HI, max_tokens=200, temperature=0) == (text, "stop")


def test_prompt_too_long_is_an_engine_error(engine) -> None:
    with pytest.raises(EngineError, match="does not fit"):
        list(engine.stream([{"role": "user", "content": "word " * 2000}], max_tokens=5))


def test_loader_attach_switch_and_zeroing(engine, vault, tmp_path: Path) -> None:
    from runtime.loader import attach

    _seal(vault, tmp_path, "alpha", seed=1)
    _seal(vault, tmp_path, "beta", seed=2)
    llm_before = engine.llm
    base = engine.first_token_logits(HI)
    spy = _Spy(vault)
    memfds_before = _memfds()
    for name in ("alpha", "beta"):
        report = attach(engine, spy, name, guard=PassThroughGuard())
        assert report.gguf_bytes > 0 and report.audit.verdict == "pass"
    assert _memfds() == memfds_before  # the memory files are closed right after loading
    assert all(len(buf) > 1000 and not any(buf) for buf in spy.opened)  # plaintext zeroed after loading
    a = engine.first_token_logits(HI, adapter="alpha")
    b = engine.first_token_logits(HI, adapter="beta")
    assert np.abs(a - base).mean() > 1e-2 and np.abs(b - base).mean() > 1e-2 and np.abs(a - b).mean() > 1e-2
    # switching is in place: same llama.cpp model, and back to the base gives the base's logits exactly
    engine.use("alpha")
    engine.use(None)
    np.testing.assert_array_equal(engine.first_token_logits(HI), base)
    np.testing.assert_array_equal(engine.first_token_logits(HI, adapter="alpha"), a)
    assert engine.llm is llm_before and engine.adapters == ["alpha", "beta"]
    engine.unload_adapter("alpha")
    engine.unload_adapter("beta")


def test_adapter_for_another_base_is_refused(engine, vault, tmp_path: Path) -> None:
    from runtime.loader import attach

    _seal(vault, tmp_path, "other", base_sha256="ab" * 32)
    spy = _Spy(vault)
    with pytest.raises(BaseModelError, match="sealed for base"):
        attach(engine, spy, "other", guard=PassThroughGuard())
    assert "other" not in engine.adapters
    assert not any(spy.opened[0])


def test_audit_reject_blocks_loading(engine, vault, tmp_path: Path) -> None:
    from runtime.loader import attach

    class Rejecting(PassThroughGuard):
        seen: list = []

        def audit_adapter(self, adapter, base):
            self.seen.append((sorted(adapter)[:1], adapter.peft_config["r"], base.sha256))
            return AuditReport("reject", ("test rejection",))

    _seal(vault, tmp_path, "bad")
    with pytest.raises(AuditRejectedError, match="test rejection"):
        attach(engine, vault, "bad", guard=Rejecting())
    assert "bad" not in engine.adapters and Rejecting.seen[0][1] == 8


# -- chat: the guard on the way in and out --------------------------------------------------------


class _Guard(PassThroughGuard):
    """Blocks prompts containing 'forbidden' and outputs once they contain ``bad_output``."""

    def __init__(self, bad_output: str | None = None) -> None:
        self.bad_output, self.screened = bad_output, []

    def screen_prompt(self, messages):
        return Verdict(False, "S2", 1.0) if "forbidden" in messages[-1]["content"] else Verdict(True)

    def screen_output(self, text, messages):
        self.screened.append(text)
        blocked = self.bad_output is not None and self.bad_output in text
        return Verdict(not blocked, "S1" if blocked else None)


def test_blocked_prompt_gets_runtime_refusal(engine) -> None:
    guard = _Guard()
    chunks = list(respond(engine, guard, [{"role": "user", "content": "a forbidden thing"}]))
    assert [(c.text, c.finish_reason, c.replace) for c in chunks] == [(REFUSAL, "content_filter", True)]
    assert chunks[0].verdict.category == "S2" and guard.screened == []  # the model never ran


def test_only_screened_text_is_released(engine) -> None:
    text, _ = engine.generate(HI, max_tokens=60, temperature=0)
    guard = _Guard()
    chunks = list(respond(engine, guard, HI, max_tokens=60, temperature=0, screen_every=4))
    released = ""
    for chunk in chunks:
        released += chunk.text
        assert any(s.startswith(released) for s in guard.screened)  # nothing leaves unscreened
    assert released == text and guard.screened[-1] == text and chunks[-1].finish_reason == "stop"


def test_output_hit_stops_and_replaces(engine) -> None:
    text, _ = engine.generate(HI, max_tokens=60, temperature=0)
    trigger = text.split()[2]
    guard = _Guard(bad_output=trigger)
    result = complete(engine, guard, HI, max_tokens=60, temperature=0, screen_every=2)
    assert (result.text, result.finish_reason, result.verdict.category) == (REFUSAL, "content_filter", "S1")
    chat = Chat(engine, guard, max_tokens=60, temperature=0)
    chunks = list(chat.send("Say hi."))
    assert chunks[-1].replace and all(trigger not in c.text for c in chunks)
    assert chat.history[-1] == {"role": "assistant", "content": REFUSAL}


def test_chat_keeps_history_and_system(engine) -> None:
    chat = Chat(engine, PassThroughGuard(), system="You answer in one word.", max_tokens=20, temperature=0)
    list(chat.send("Name a colour."))
    list(chat.send("Another one."))
    assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.last is not None and chat.last.completion_tokens > 0
    chat.reset()
    assert chat.messages() == [{"role": "system", "content": "You answer in one word."}]


# -- memfd and hardening --------------------------------------------------------------------------


def test_memfd_is_sealed_and_cloexec() -> None:
    import fcntl

    data = bytearray(b"secret" * 100)
    with MemFile(data) as mem:
        assert fcntl.fcntl(mem.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.readlink(mem.path).startswith("/memfd:")
        with pytest.raises(PermissionError):
            os.write(mem.fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 0)
        assert Path(mem.path).read_bytes() == bytes(data)
    assert mem.closed
    zero(data)
    assert not any(data)


def test_process_hardening_in_a_child() -> None:
    code = ("import json, resource; from runtime.memfd import harden; h = harden(); "
            "import ctypes; libc = ctypes.CDLL(None); "
            "print(json.dumps([h.to_json(), resource.getrlimit(resource.RLIMIT_CORE), libc.prctl(3, 0, 0, 0, 0)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    report, core, dumpable = json.loads(out.stdout)
    assert report["core_dumps_off"] and report["not_dumpable"]
    assert core == [0, 0] and dumpable == 0  # PR_GET_DUMPABLE


def test_thread_choice_leaves_busy_cores_alone() -> None:
    from runtime.models import recommended_threads

    assert recommended_threads(4, 0.0) == 4
    assert recommended_threads(4, 2.2) == 2
    assert recommended_threads(2, 12.0) == 1  # never 0, never more than the free cores
    assert 1 <= recommended_threads() <= os.cpu_count()
