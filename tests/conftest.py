"""Shared fixtures: an isolated vault home and a real, private Secret Service.

Every test gets its own VAULT_HOME under tmp_path (autouse). Tests that touch the
keyring ask for ``keyring_env``: it points the ``keyring`` library at a real
gnome-keyring running on a private D-Bus session bus started for this test run.
When that cannot be started the tests skip locally but fail under CI (CI=true).
Multi-user tests use ``make_user`` to get a separate home *and* a separate keyring.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from secret_service import SecretService, missing_reason  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"required test component missing under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point VAULT_HOME at a fresh directory so no test sees the user's real vault."""
    home = tmp_path / "vault-home"
    monkeypatch.setenv("VAULT_HOME", str(home))
    monkeypatch.delenv("VAULT_LOG_PROMPTS", raising=False)
    return home


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory: pytest.TempPathFactory):
    """One private, unlocked gnome-keyring for the whole session."""
    reason = missing_reason()
    if reason:
        _unavailable(reason)
    service = SecretService(tmp_path_factory.mktemp("secret-service"))
    try:
        service.start()
    except Exception as exc:  # noqa: BLE001 - reported as skip/fail below
        _unavailable(f"cannot start a private Secret Service: {exc}")
    yield service
    service.stop()


@pytest.fixture
def keyring_env(secret_service: SecretService, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Make the keyring library (in-process and in subprocesses) use the private service."""
    import keyring
    from keyring.backends import SecretService as SecretServiceBackend

    for key, value in secret_service.env.items():
        monkeypatch.setenv(key, value)
    previous = keyring.get_keyring()
    keyring.set_keyring(SecretServiceBackend.Keyring())
    yield secret_service.env
    keyring.set_keyring(previous)


@dataclass
class User:
    """One person: their own VAULT_HOME and their own real keyring."""

    name: str
    home: Path
    service: SecretService
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture
def make_user(tmp_path: Path):
    """Factory for users with separate homes and separate Secret Services (alice, bob, carol)."""
    reason = missing_reason()
    if reason:
        _unavailable(reason)
    started: list[SecretService] = []

    def _make(name: str) -> User:
        root = tmp_path / f"user-{name}"
        service = SecretService(root / "keyring").start()
        started.append(service)
        env = dict(os.environ)
        env.update(service.env)
        env["VAULT_HOME"] = str(root / "vault")
        return User(name=name, home=root / "vault", service=service, env=env)

    yield _make
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only ../shared/data folder (AdvBench, XSTest)."""
    if not SHARED_DATA.is_dir():
        _unavailable(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def reader_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts the guard's multilingual reader scores while the test runs (runtime.guard.multilingual)."""
    from runtime.guard.multilingual import MultilingualHead

    calls: list[str] = []
    original = MultilingualHead.score

    def spy(self, text):
        calls.append(text)
        return original(self, text)

    monkeypatch.setattr(MultilingualHead, "score", spy)
    return calls
