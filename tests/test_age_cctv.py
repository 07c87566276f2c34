"""The complete C2SP CCTV age suite: every vector accepted or rejected as its ``expect:`` says.

Each vector is also checked at the stage where it must fail (armor, header, header MAC,
payload) by running the decryption steps one by one, so a vector that fails "for the
wrong reason" (say, a payload vector rejected by the header parser) is caught.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vault import age
from vault.age.armor import dearmor
from vault.age.crypt import unwrap_file_key, verify_header_mac
from vault.age.format import parse_header
from vault.errors import IntegrityError, NoIdentityError

VECTORS = Path(__file__).parent / "vectors" / "cctv-age"
EXPECTATIONS = {"success", "no match", "armor failure", "header failure", "HMAC failure", "payload failure"}


@dataclass
class Vector:
    name: str
    expect: str
    body: bytes
    payload: str | None = None
    file_key: bytes = b""
    identities: list = field(default_factory=list)
    armored: bool = False


def load(path: Path) -> Vector:
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    v = Vector(name=path.name, expect="", body=body)
    compressed = False
    for line in head.decode().splitlines():
        key, _, value = line.partition(": ")
        if key == "expect":
            v.expect = value
        elif key == "payload":
            v.payload = value
        elif key == "file key":
            v.file_key = bytes.fromhex(value)
        elif key == "identity":
            v.identities.append(age.parse_identity(value))
        elif key == "passphrase":
            v.identities.append(age.ScryptIdentity(value.encode()))
        elif key == "armored":
            v.armored = value == "yes"
        elif key == "compressed":
            assert value == "zlib"
            compressed = True
        elif key != "comment":
            raise AssertionError(f"unknown vector field {key!r} in {path.name}")
    if compressed:
        v.body = zlib.decompress(v.body)
    assert v.expect in EXPECTATIONS, v.expect
    return v


NAMES = sorted(p.name for p in VECTORS.iterdir() if p.name != "README.md")


def test_suite_is_complete() -> None:
    assert len(NAMES) == 143


def _failing_stage(v: Vector) -> str | None:
    """Run the steps of decryption one at a time; return where it failed (None: it didn't)."""
    data = v.body
    if v.armored:
        try:
            data = dearmor(data)
        except IntegrityError:
            return "armor failure"
    try:
        header, offset = parse_header(data)
        file_key = unwrap_file_key(header, v.identities)
    except NoIdentityError:
        return "no match"
    except IntegrityError:
        return "header failure"
    assert file_key == v.file_key
    try:
        verify_header_mac(header, file_key)
    except IntegrityError:
        return "HMAC failure"
    if len(data) - offset < 16:  # the payload nonce is read with the header
        return "header failure"
    return None


@pytest.mark.parametrize("name", NAMES)
def test_vector(name: str) -> None:
    v = load(VECTORS / name)
    stage = _failing_stage(v)
    if v.expect == "success":
        assert stage is None
        plaintext = age.decrypt(v.body, v.identities)
        assert hashlib.sha256(plaintext).hexdigest() == v.payload
        return
    if v.expect == "payload failure":
        assert stage is None
    else:
        assert stage == v.expect
    expected_error = NoIdentityError if v.expect == "no match" else IntegrityError
    with pytest.raises(expected_error):
        age.decrypt(v.body, v.identities)


@pytest.mark.parametrize("name", NAMES)
def test_vector_from_file(name: str, tmp_path: Path) -> None:
    """decrypt_file (the mmap path) agrees with decrypt on every vector."""
    v = load(VECTORS / name)
    path = tmp_path / "f.age"
    path.write_bytes(v.body)
    if v.expect == "success":
        assert hashlib.sha256(age.decrypt_file(path, v.identities)).hexdigest() == v.payload
    else:
        with pytest.raises(NoIdentityError if v.expect == "no match" else IntegrityError):
            age.decrypt_file(path, v.identities)
