"""vault.age: round trips, tamper/truncation rejection, limits, keys, rewrap, buffers.

Property tests (hypothesis) cover payload sizes around the 64 KiB chunk boundary, single
bit flips and truncations anywhere in a file, the header grammar and the armor.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vault import age
from vault.age import format as fmt
from vault.age import stream
from vault.age.armor import armor, dearmor
from vault.errors import IntegrityError, NoIdentityError

CHUNK = stream.CHUNK_SIZE
# 100 chunks + 5 bytes takes the two-thread path (>= 64 chunks).
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17, 100 * CHUNK + 5]
ID = age.X25519Identity.generate()
OTHER = age.X25519Identity.generate()
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _payload_offset(sealed: bytes) -> int:
    return parse_offset(sealed) + stream.NONCE_SIZE


def parse_offset(sealed: bytes) -> int:
    return fmt.parse_header(sealed)[1]


# --- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_round_trip_all_paths(size: int, tmp_path: Path) -> None:
    data = os.urandom(size)
    sealed = age.encrypt(data, [ID.recipient])
    assert len(sealed) == _payload_offset(sealed) + stream.ciphertext_size(size)
    assert age.decrypt(sealed, [ID]) == data
    assert age.payload_size(sealed) == size
    path = tmp_path / "f.age"
    with open(path, "wb") as f:
        age.encrypt_to_file(f, data, [ID.recipient])
    assert age.decrypt_file(path, [ID]) == data
    assert age.payload_size(path) == size
    assert age.decrypt(age.encrypt(data, ID.recipient, armor=True), ID) == data


@PROPERTY
@given(st.binary(max_size=3 * CHUNK + 100))
def test_round_trip_property(data: bytes) -> None:
    assert age.decrypt(age.encrypt(data, [ID.recipient]), [ID]) == data


@pytest.mark.parametrize("size", [0, CHUNK, 4 * 1024 * 1024 + 3])
def test_encrypt_to_file_matches_stream_layout(size: int) -> None:
    """Streaming to a file (4 MiB blocks) produces a file the in-memory path reads."""
    buf = io.BytesIO()
    data = os.urandom(size)
    age.encrypt_to_file(buf, data, ID.recipient)
    assert age.decrypt(buf.getvalue(), ID) == data


def test_multiple_recipients_each_decrypt() -> None:
    sealed = age.encrypt(b"shared", [ID.recipient, OTHER.recipient])
    for ident in (ID, OTHER):
        assert age.decrypt(sealed, [ident]) == b"shared"
    pq = [age.HybridIdentity.generate(), age.HybridIdentity.generate()]
    sealed = age.encrypt(b"pq", [i.recipient for i in pq])
    for ident in pq:
        assert age.decrypt(sealed, [ID, ident]) == b"pq"


def test_post_quantum_and_classic_cannot_mix() -> None:
    with pytest.raises(ValueError):
        age.encrypt(b"x", [ID.recipient, age.HybridIdentity.generate().recipient])


def test_file_key_and_nonce_fresh_per_file() -> None:
    a = age.encrypt(b"same", ID.recipient)
    b = age.encrypt(b"same", ID.recipient)
    assert a != b and a[_payload_offset(a):] != b[_payload_offset(b):]


# --- rejection -----------------------------------------------------------------------------

def test_wrong_identity_is_no_identity_error() -> None:
    with pytest.raises(NoIdentityError):
        age.decrypt(age.encrypt(b"x", ID.recipient), [OTHER])


SMALL = os.urandom(2 * CHUNK + 333)
SEALED = age.encrypt(SMALL, ID.recipient)
MAC_START = SEALED.index(b"\n---") + 1
PAYLOAD_START = _payload_offset(SEALED) - stream.NONCE_SIZE


@PROPERTY
@given(st.integers(0, len(SEALED) * 8 - 1))
def test_any_bit_flip_is_rejected(bit: int) -> None:
    tampered = bytearray(SEALED)
    tampered[bit // 8] ^= 1 << (bit % 8)
    # A flip inside a stanza may make it look addressed to someone else (no identity);
    # from the MAC line on, it can only be an integrity failure.
    expected = IntegrityError if bit // 8 >= MAC_START else (IntegrityError, NoIdentityError)
    with pytest.raises(expected):
        age.decrypt(tampered, ID)


@pytest.mark.parametrize("where", ["version", "mac", "nonce", "first_chunk", "last_tag"])
def test_bit_flip_at_each_part(where: str) -> None:
    pos = {"version": 3, "mac": MAC_START + 5, "nonce": PAYLOAD_START + 2,
           "first_chunk": PAYLOAD_START + 20, "last_tag": len(SEALED) - 1}[where]
    tampered = bytearray(SEALED)
    tampered[pos] ^= 0x40
    with pytest.raises(IntegrityError):
        age.decrypt(tampered, ID)


@PROPERTY
@given(st.integers(0, len(SEALED) - 1))
def test_any_truncation_is_rejected(length: int) -> None:
    with pytest.raises(IntegrityError):
        age.decrypt(SEALED[:length], ID)


@pytest.mark.parametrize("tail", [b"\x00", os.urandom(16), os.urandom(CHUNK + 16)])
def test_extension_is_rejected(tail: bytes) -> None:
    with pytest.raises(IntegrityError):
        age.decrypt(SEALED + tail, ID)


def test_truncation_at_chunk_boundary_is_rejected() -> None:
    """Dropping whole trailing chunks leaves a valid-looking stream with no final chunk."""
    cut = PAYLOAD_START + stream.NONCE_SIZE + stream.ENC_CHUNK_SIZE
    with pytest.raises(IntegrityError):
        age.decrypt(SEALED[:cut], ID)


def test_chunk_swap_is_rejected() -> None:
    data = os.urandom(3 * CHUNK)
    sealed = bytearray(age.encrypt(data, ID.recipient))
    p = _payload_offset(bytes(sealed))
    c = stream.ENC_CHUNK_SIZE
    first, second = sealed[p : p + c], sealed[p + c : p + 2 * c]
    sealed[p : p + c], sealed[p + c : p + 2 * c] = second, first
    with pytest.raises(IntegrityError):
        age.decrypt(sealed, ID)


def test_header_from_another_file_is_rejected() -> None:
    """Same key and recipient, spliced header: the payload nonce/key no longer match."""
    other = age.encrypt(SMALL, ID.recipient)
    spliced = other[: parse_offset(other)] + SEALED[PAYLOAD_START:]
    with pytest.raises(IntegrityError):
        age.decrypt(spliced, ID)


# --- never release unauthenticated plaintext ------------------------------------------------

@pytest.mark.parametrize("chunks", [3, 64])  # 64 chunks takes the two-thread path
def test_failed_decrypt_wipes_caller_buffer(chunks: int, tmp_path: Path) -> None:
    data = os.urandom(chunks * CHUNK)
    sealed = bytearray(age.encrypt(data, ID.recipient))
    sealed[-1] ^= 1  # the final chunk's tag: every other chunk authenticates and decrypts
    path = tmp_path / "bad.age"
    path.write_bytes(sealed)
    out = bytearray(b"\xaa" * len(data))
    with pytest.raises(IntegrityError):
        age.decrypt_file(path, ID, out=out)
    assert out == bytes(len(data))


def test_decrypt_file_into_caller_buffer(tmp_path: Path) -> None:
    data = os.urandom(5 * CHUNK + 1)
    path = tmp_path / "f.age"
    path.write_bytes(age.encrypt(data, ID.recipient))
    out = bytearray(len(data))
    assert age.decrypt_file(path, ID, out=memoryview(out)) is not None
    assert out == data
    with pytest.raises(ValueError):
        age.decrypt_file(path, ID, out=bytearray(len(data) - 1))


def test_decrypt_file_empty_and_armored(tmp_path: Path) -> None:
    empty = tmp_path / "empty.age"
    empty.write_bytes(b"")
    with pytest.raises(IntegrityError):
        age.decrypt_file(empty, ID)
    armored = tmp_path / "a.age"
    armored.write_bytes(age.encrypt(b"hello", ID.recipient, armor=True))
    assert age.decrypt_file(armored, ID) == b"hello"
    out = bytearray(5)
    assert age.decrypt_file(armored, ID, out=out) is out and out == b"hello"


# --- header grammar and limits ----------------------------------------------------------------

_ARG = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)


@PROPERTY
@given(st.lists(st.tuples(_ARG, st.lists(_ARG, max_size=3), st.binary(max_size=200)), min_size=1, max_size=5))
def test_header_serialize_parse_round_trip(raw: list) -> None:
    stanzas = [fmt.Stanza(t, tuple(a), b) for t, a, b in raw]
    mac_input = fmt.serialize_header(stanzas)
    header, offset = fmt.parse_header(fmt.finish_header(mac_input, bytes(32)) + b"payload")
    assert header.stanzas == tuple(stanzas)
    assert header.mac_input == mac_input and header.mac == bytes(32)
    assert offset == len(fmt.finish_header(mac_input, bytes(32)))


@PROPERTY
@given(st.binary(max_size=400))
def test_parser_fails_only_with_integrity_error(junk: bytes) -> None:
    for candidate in (junk, b"age-encryption.org/v1\n" + junk, b"-----BEGIN AGE ENCRYPTED FILE-----\n" + junk):
        try:
            age.decrypt(candidate, ID)
        except IntegrityError:
            pass


@PROPERTY
@given(st.integers(0, len(SEALED)), st.binary(min_size=1, max_size=70))
def test_inserted_bytes_are_rejected(pos: int, extra: bytes) -> None:
    with pytest.raises((IntegrityError, NoIdentityError)):
        age.decrypt(SEALED[:pos] + extra + SEALED[pos:], ID)


def _header(*lines: bytes) -> bytes:
    return b"\n".join([b"age-encryption.org/v1", *lines, b"--- " + fmt.b64encode(bytes(32)).encode(), b""])


@pytest.mark.parametrize("bad", [
    _header(),  # no stanza
    _header(b"-> X25519 " + b"A" * (fmt.MAX_LINE_LENGTH + 1), b""),  # line over the limit
    _header(*[b"-> t\n"] * (fmt.MAX_STANZAS + 1)),  # too many stanzas
    b"age-encryption.org/v1\n-> t\n" + b"A" * fmt.MAX_HEADER_SIZE,  # never ends
    _header(b"-> t", b"AAAA="),  # padding
    _header(b"-> t", b"AB"),  # non-canonical trailing bits
    _header(b"-> t\x7f", b""),  # non-VCHAR argument
    _header(b"-> t", b"A" * 65),  # body line over 64 columns
    _header(b"->  t", b""),  # empty argument
    b"age-encryption.org/v2\n-> t\n\n--- " + fmt.b64encode(bytes(32)).encode() + b"\n",
])
def test_malformed_headers_are_rejected(bad: bytes) -> None:
    with pytest.raises(IntegrityError):
        fmt.parse_header(bad)


class _Grease:
    """A recipient of an unknown type, as age's GREASE stanzas look to us."""

    def wrap(self, file_key: bytes) -> list[fmt.Stanza]:
        return [fmt.Stanza("grease.example/x", ("arg", "Z9"), os.urandom(77))]


def test_unknown_stanzas_are_ignored() -> None:
    sealed = age.encrypt(b"x", [_Grease(), ID.recipient, _Grease()])
    assert [s.type for s in fmt.parse_header(sealed)[0].stanzas] == ["grease.example/x", "X25519", "grease.example/x"]
    assert age.decrypt(sealed, ID) == b"x"
    with pytest.raises(NoIdentityError):
        age.decrypt(sealed, OTHER)


def test_b64_strictness() -> None:
    assert fmt.b64decode("AAAA") == bytes(3)
    for bad in ["AAA=", "AB", "A", "AA\n", "AA A", "AÄ"]:
        with pytest.raises(ValueError):
            fmt.b64decode(bad)


# --- scrypt -------------------------------------------------------------------------------------

def test_scrypt_round_trip_and_rules() -> None:
    sealed = age.encrypt(b"secret", age.ScryptRecipient(b"correct horse", work_factor=10))
    assert age.decrypt(sealed, age.ScryptIdentity(b"correct horse")) == b"secret"
    with pytest.raises(NoIdentityError):
        age.decrypt(sealed, age.ScryptIdentity(b"wrong"))
    with pytest.raises(IntegrityError):  # work factor over the identity's limit: refused, not computed
        age.decrypt(sealed, age.ScryptIdentity(b"correct horse", max_work_factor=9))
    with pytest.raises(ValueError):  # an scrypt stanza must be alone
        age.encrypt(b"x", [age.ScryptRecipient(b"pw", work_factor=10), ID.recipient])
    with pytest.raises(ValueError):
        age.ScryptRecipient(b"pw", work_factor=23)


# --- keys ----------------------------------------------------------------------------------------

def test_spec_key_examples() -> None:
    """Known answers from the age spec (c2sp.org/age)."""
    x = age.parse_identity("AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX")
    assert x.recipient.to_string() == "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
    pq = age.parse_identity("AGE-SECRET-KEY-PQ-1XX76JRALNLXDMEW0CRK45QMCCH4X06SE84UN3VPM33W6HWDX0H3SK3ZQFR")
    assert pq.recipient.to_string().startswith("age1pq1x34nzsvr0rxjsgdn8zgyhfe8j7ceq5r9rdelkjuh3y235jzx")
    assert pq.recipient.to_string().endswith("zv49zc0k")


@pytest.mark.parametrize("cls", [age.X25519Identity, age.HybridIdentity])
def test_key_strings_round_trip(cls: type) -> None:
    ident = cls.generate()
    again = age.parse_identity(ident.to_string())
    assert again.to_string() == ident.to_string()
    assert age.parse_recipient(ident.recipient.to_string()) == ident.recipient
    assert ident.to_string() not in repr(ident)


@pytest.mark.parametrize("bad", [
    "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwx",  # checksum
    "AGE1ZVKYG2LQZRAA2LNJVQEJ32NKUU0UES2S82HZRYE869XEEXVN73EQUNUJWJ",  # uppercase recipient
    "age1Zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj",  # mixed case
    "age1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq",  # wrong length
    "ssh-ed25519 AAAA",
])
def test_malformed_recipients(bad: str) -> None:
    with pytest.raises(ValueError):
        age.parse_recipient(bad)


def test_malformed_identities() -> None:
    good = ID.to_string()
    for bad in [good.lower(), good[:-1] + ("Q" if good[-1] != "Q" else "P"), "AGE-SECRET-KEY-1", "nope"]:
        with pytest.raises(ValueError):
            age.parse_identity(bad)


# --- rewrap --------------------------------------------------------------------------------------

def test_rewrap_keeps_payload_and_drops_old_recipients(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 7)
    sealed = age.encrypt(data, [ID.recipient, OTHER.recipient])
    new = age.X25519Identity.generate()
    rewrapped = age.rewrap(sealed, [ID], [new.recipient])
    assert rewrapped[_payload_offset(rewrapped) - 16:] == sealed[_payload_offset(sealed) - 16:]
    assert age.decrypt(rewrapped, new) == data
    for old in (ID, OTHER):
        with pytest.raises(NoIdentityError):
            age.decrypt(rewrapped, old)
    path = tmp_path / "f.age"
    path.write_bytes(sealed)
    assert age.decrypt(age.rewrap(path, OTHER, new.recipient), new) == data


def test_rewrap_refuses_damaged_payload() -> None:
    sealed = bytearray(age.encrypt(os.urandom(2 * CHUNK), ID.recipient))
    sealed[-40] ^= 1
    with pytest.raises(IntegrityError):
        age.rewrap(sealed, ID, OTHER.recipient)
    with pytest.raises(NoIdentityError):
        age.rewrap(sealed, OTHER, ID.recipient)


# --- armor ---------------------------------------------------------------------------------------

@PROPERTY
@given(st.binary(max_size=500))
def test_armor_round_trip(data: bytes) -> None:
    armored = armor(data)
    assert all(len(line) <= 64 for line in armored.splitlines()[1:-1])
    assert dearmor(armored) == data
    assert dearmor(b"\r\n  " + armored.replace(b"\n", b"\r\n") + b"\n\t ") == data


@pytest.mark.parametrize("mutate", [
    lambda a: a.replace(b"-----\n", b"-----\nComment: x\n\n", 1),
    lambda a: a + b"garbage",
    lambda a: b"x" + a,
    lambda a: a.replace(b"=", b""),
    lambda a: a.replace(b"\n", b" \n", 2),
    lambda a: b" " * 1025 + a,
    lambda a: a + b" " * 1024,
])
def test_armor_rejects_non_canonical(mutate) -> None:
    armored = armor(os.urandom(100))
    with pytest.raises(IntegrityError):
        dearmor(mutate(armored))
