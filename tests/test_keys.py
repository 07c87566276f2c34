"""vault.keys: named secrets in a real Secret Service, and clear errors when there is none or it is locked."""

from __future__ import annotations

import keyring
import pytest
import secretstorage
from keyring.backends import SecretService as SecretServiceBackend
from keyring.backends import fail

from vault.errors import KeyringLockedError, KeyringMissingError
from vault.keys import KeyStore, backend_name


def test_set_get_delete_round_trip(keyring_env) -> None:
    keys = KeyStore("0123abcd")
    assert keys.get("device-identity") is None
    keys.set("device-identity", "AGE-SECRET-KEY-1TEST")
    assert keys.get("device-identity") == "AGE-SECRET-KEY-1TEST"
    keys.set("device-identity", "AGE-SECRET-KEY-1OTHER")  # replace, not duplicate
    assert keys.get("device-identity") == "AGE-SECRET-KEY-1OTHER"
    assert keys.delete("device-identity") is True
    assert keys.get("device-identity") is None
    assert keys.delete("device-identity") is False


def test_secrets_are_namespaced_per_vault(keyring_env) -> None:
    alice, other = KeyStore("aaaa1111"), KeyStore("bbbb2222")
    alice.set("serve-token", "secret-a")
    assert other.get("serve-token") is None
    assert keyring.get_password("vault:aaaa1111", "serve-token") == "secret-a"  # the service name is stable
    assert alice.with_vault_id("bbbb2222").get("serve-token") is None
    assert "SecretService" in alice.check()


def test_no_backend_says_how_to_start_one() -> None:
    keys = KeyStore("0123abcd", backend=fail.Keyring())
    with pytest.raises(KeyringMissingError, match="gnome-keyring-daemon --unlock"):
        keys.get("device-identity")
    with pytest.raises(KeyringMissingError):
        backend_name(fail.Keyring())


def test_unreachable_dbus_is_keyring_missing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", f"unix:path={tmp_path}/no-such-bus")
    keys = KeyStore("0123abcd", backend=SecretServiceBackend.Keyring())
    with pytest.raises(KeyringMissingError, match="dbus-run-session"):
        keys.set("device-identity", "x")


def test_locked_keyring_is_keyring_locked(make_user, monkeypatch: pytest.MonkeyPatch) -> None:
    user = make_user("locked")
    for key, value in user.service.env.items():
        monkeypatch.setenv(key, value)
    keys = KeyStore("0123abcd", backend=SecretServiceBackend.Keyring())
    keys.set("device-identity", "AGE-SECRET-KEY-1TEST")
    connection = secretstorage.dbus_init()
    try:
        secretstorage.get_default_collection(connection).lock()
    finally:
        connection.close()
    # headless: the unlock prompt cannot be shown, so the Secret Service dismisses it
    with pytest.raises(KeyringLockedError, match="locked"):
        keys.get("device-identity")
