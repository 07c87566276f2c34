"""Start a real, private Secret Service (dbus-daemon + gnome-keyring-daemon) for tests.

Each :class:`SecretService` is one user's keyring: its own session bus, its own
HOME for the keyring files, unlocked with a throwaway password. Tests point the
``keyring`` library at it by setting ``DBUS_SESSION_BUS_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SecretService", "available", "missing_reason", "private_vault_env"]


def missing_reason() -> str | None:
    """Why a private Secret Service cannot be started here, or None if it can."""
    for tool in ("dbus-daemon", "gnome-keyring-daemon"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install dbus gnome-keyring)"
    return None


def available() -> bool:
    return missing_reason() is None


class SecretService:
    """A private session bus with an unlocked gnome-keyring on it."""

    def __init__(self, root: Path, password: str = "test-keyring-password") -> None:
        self.root = Path(root)
        self.password = password
        self.address: str | None = None
        self._bus_pid: int | None = None
        self._keyring_pid: int | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that make ``keyring`` talk to this service."""
        assert self.address is not None, "service not started"
        return {
            "DBUS_SESSION_BUS_ADDRESS": self.address,
            "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring",
        }

    def start(self) -> "SecretService":
        home = self.root / "home"
        runtime_dir = self.root / "run"
        home.mkdir(parents=True, exist_ok=True)
        runtime_dir.mkdir(parents=True, exist_ok=True)
        runtime_dir.chmod(0o700)
        out = subprocess.run(
            ["dbus-daemon", "--session", "--fork", "--nosyslog", "--print-address=1", "--print-pid=1"],
            capture_output=True, text=True, check=True, timeout=20,
        ).stdout.split()
        self.address, self._bus_pid = out[0], int(out[1])
        env = dict(os.environ)
        env.update(
            DBUS_SESSION_BUS_ADDRESS=self.address,
            HOME=str(home),
            XDG_DATA_HOME=str(home / ".local/share"),
            XDG_RUNTIME_DIR=str(runtime_dir),
        )
        proc = subprocess.run(
            ["gnome-keyring-daemon", "--unlock", "--components=secrets"],
            input=self.password, capture_output=True, text=True, env=env, timeout=20,
        )
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"gnome-keyring-daemon failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            if line.startswith("GNOME_KEYRING_PID="):
                self._keyring_pid = int(line.split("=", 1)[1])
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # do not leak the bus and the daemon when the service never became ready
            raise
        return self

    def _wait_ready(self) -> None:
        """Wait until OUR gnome-keyring owns the secrets name and its login collection is unlocked.

        Nothing may talk to org.freedesktop.secrets before our daemon owns the name: the session
        bus would D-Bus-activate a second gnome-keyring from its service file, with the bus's own
        environment (HOME=/root), which then owns the name with no login keyring and no password,
        and every later call fails (secretstorage's check_service_availability() does not help:
        it is also true when the name is merely activatable). Seen when starting several services.
        """
        import secretstorage
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        bus = DBusAddress("/org/freedesktop/DBus", bus_name="org.freedesktop.DBus", interface="org.freedesktop.DBus")
        deadline = time.monotonic() + 15
        while True:
            try:
                conn = open_dbus_connection(bus=self.address)
                try:
                    owned = conn.send_and_get_reply(new_method_call(bus, "NameHasOwner", "s", ("org.freedesktop.secrets",)))
                    if owned.body[0]:
                        col = secretstorage.Collection(conn)  # the "default" alias; raises if not set yet
                        if not col.is_locked():
                            return
                finally:
                    conn.close()
            except Exception:  # noqa: BLE001 - retried until the deadline
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError("gnome-keyring did not become ready within 15 s")
            time.sleep(0.1)

    def stop(self) -> None:
        for pid in (self._keyring_pid, self._bus_pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self._keyring_pid = self._bus_pid = None

    def __enter__(self) -> "SecretService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def private_vault_env(prefix: str) -> Iterator[Path]:
    """For benchmarks: a temporary directory holding VAULT_HOME and a private, unlocked Secret Service
    that this process's ``keyring`` uses. Yields the directory; the service is stopped on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        service = SecretService(root / "keyring").start()
        try:
            os.environ.update(service.env)
            os.environ["VAULT_HOME"] = str(root / "vault")
            import keyring
            from keyring.backends import SecretService as SecretServiceBackend

            keyring.set_keyring(SecretServiceBackend.Keyring())
            yield root
        finally:
            service.stop()
