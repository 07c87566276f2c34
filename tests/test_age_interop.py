"""vault.age against the real age CLI (Go, Debian package ``age``) and pyrage (rage), both ways.

The age CLI reads passphrases only from a terminal, so the scrypt tests drive it through a
pseudo-terminal, as a user would.
"""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import time
from pathlib import Path

import pyrage  # a declared test dependency ([test] extra): the rage oracle
import pytest

from vault import age
from vault.errors import NoIdentityError

CHUNK = 64 * 1024
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 11, 100 * CHUNK + 3]  # the last one: two threads


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"required test component missing under CI: {tool}")
        pytest.skip(f"{tool} is not installed (Debian package 'age')")
    return path


@pytest.fixture(scope="module")
def age_cli() -> str:
    _need("age-keygen")
    return _need("age")


@pytest.fixture
def cli_identity(age_cli: str, tmp_path: Path) -> tuple[Path, age.X25519Identity]:
    """A key made by age-keygen, parsed by us from the file age-keygen wrote."""
    key_file = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key_file)], check=True, capture_output=True)
    secret = next(line for line in key_file.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-1"))
    ident = age.parse_identity(secret)
    public = subprocess.run(["age-keygen", "-y", str(key_file)], check=True, capture_output=True, text=True)
    assert public.stdout.strip() == ident.recipient.to_string()
    return key_file, ident


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("armor", [False, True])
def test_we_encrypt_age_decrypts(age_cli: str, cli_identity, tmp_path: Path, size: int, armor: bool) -> None:
    key_file, ident = cli_identity
    data = os.urandom(size)
    sealed = tmp_path / "f.age"
    sealed.write_bytes(age.encrypt(data, [ident.recipient, age.X25519Identity.generate().recipient], armor=armor))
    out = subprocess.run([age_cli, "-d", "-i", str(key_file), str(sealed)], check=True, capture_output=True)
    assert out.stdout == data


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("armor", [False, True])
def test_age_encrypts_we_decrypt(age_cli: str, cli_identity, tmp_path: Path, size: int, armor: bool) -> None:
    key_file, ident = cli_identity
    data = os.urandom(size)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    sealed = tmp_path / "f.age"
    cmd = [age_cli, "-e", "-r", ident.recipient.to_string(), "-o", str(sealed), str(plain)]
    subprocess.run(cmd[:2] + (["-a"] if armor else []) + cmd[2:], check=True, capture_output=True)
    assert age.decrypt(sealed.read_bytes(), ident) == data
    assert age.decrypt_file(sealed, ident) == data
    assert age.payload_size(sealed) == size
    with pytest.raises(NoIdentityError):
        age.decrypt_file(sealed, age.X25519Identity.generate())


def test_rewrapped_file_opens_with_age(age_cli: str, cli_identity, tmp_path: Path) -> None:
    """`vault rotate` output stays a standard age file the stock tool opens."""
    key_file, ident = cli_identity
    data = os.urandom(3 * CHUNK)
    old = age.X25519Identity.generate()
    sealed = tmp_path / "f.age"
    sealed.write_bytes(age.rewrap(age.encrypt(data, old.recipient), old, ident.recipient))
    out = subprocess.run([age_cli, "-d", "-i", str(key_file), str(sealed)], check=True, capture_output=True)
    assert out.stdout == data


def _run_with_passphrase(argv: list[str], passphrase: bytes, timeout: float = 60) -> bytes:
    """Run ``argv`` on a pseudo-terminal, answering every passphrase prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # child: age opens /dev/tty, which is now this pty
        os.execvp(argv[0], argv)
    output, answered, deadline = b"", 0, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            output += data
            if output.count(b"passphrase") > answered:
                answered += 1
                os.write(fd, passphrase + b"\n")
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return output


@pytest.mark.slow
def test_age_passphrase_we_decrypt(age_cli: str, tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK + 5)
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    sealed = tmp_path / "f.age"
    _run_with_passphrase([age_cli, "-p", "-o", str(sealed), str(plain)], b"tr0ub4dor&3")
    assert sealed.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")
    assert age.decrypt_file(sealed, age.ScryptIdentity(b"tr0ub4dor&3")) == data
    with pytest.raises(NoIdentityError):
        age.decrypt_file(sealed, age.ScryptIdentity(b"tr0ub4dor&4"))


@pytest.mark.slow
def test_we_passphrase_age_decrypts(age_cli: str, tmp_path: Path) -> None:
    data = os.urandom(CHUNK + 5)
    sealed = tmp_path / "f.age"
    sealed.write_bytes(age.encrypt(data, age.ScryptRecipient(b"correct horse", work_factor=12)))
    out = tmp_path / "out"
    _run_with_passphrase([age_cli, "-d", "-o", str(out), str(sealed)], b"correct horse")
    assert out.read_bytes() == data


# --- pyrage (rage, Rust) ------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_pyrage_x25519_both_ways(size: int) -> None:
    data = os.urandom(size)
    theirs = pyrage.x25519.Identity.generate()
    ours = age.X25519Identity.generate()
    assert str(theirs.to_public()) == age.parse_identity(str(theirs)).recipient.to_string()
    # us -> rage
    sealed = age.encrypt(data, [age.parse_recipient(str(theirs.to_public())), ours.recipient])
    assert pyrage.decrypt(sealed, [theirs]) == data
    # rage -> us
    sealed = pyrage.encrypt(data, [pyrage.x25519.Recipient.from_str(ours.recipient.to_string())])
    assert age.decrypt(sealed, [ours]) == data


@pytest.mark.slow
def test_pyrage_passphrase_both_ways() -> None:
    data = os.urandom(CHUNK * 2 + 1)
    sealed = age.encrypt(data, age.ScryptRecipient(b"hunter2", work_factor=10))
    assert pyrage.passphrase.decrypt(sealed, "hunter2") == data
    sealed = pyrage.passphrase.encrypt(data, "hunter2")
    assert age.decrypt(sealed, age.ScryptIdentity(b"hunter2")) == data
