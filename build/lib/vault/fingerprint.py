"""Per-licensee fingerprints in adapter weights, so that a leaked copy can be traced to its licensee.

At export, every ``lora_B`` tensor gets a tiny keyed perturbation: ``B + s * rms(B) * P`` where
``P`` is a +/-1 pattern drawn from a PRNG seeded with ``HMAC-SHA256(key, licence_id || tensor name)``
and ``s`` is :data:`STRENGTH` (0.2 % of the tensor's RMS: far below what changes an answer). The
key lives only in the licensor's keyring (``fingerprint-key``), so the licensee cannot compute the
pattern to subtract it. The licence's adapter digest is that of the fingerprinted blob.

To trace a leaked adapter, :func:`score` correlates ``leaked_B - original_B`` with each licence's
pattern; the result is a z-score (about N(0, 1) for a licence that is not the source; for the
source it grows with the square root of the number of weights, ~hundreds for a real adapter).

Limits (stated in the threat model): a licensee who knows the scheme and holds two differently
fingerprinted copies can average or diff them; adding noise several times larger than the
fingerprint, or fine-tuning the adapter, weakens the signal; it identifies a leak, it prevents none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["FINGERPRINT_KEY", "RECORD_KIND", "STRENGTH", "MATCH_Z", "Trace", "key_from", "embed", "score", "trace"]

FINGERPRINT_KEY = "fingerprint-key"
RECORD_KIND = "fingerprint"  # sealed record per export: {"adapter", "adapter_sha256", "licence"}
STRENGTH = 2e-3
MATCH_Z = 8.0  # a z-score this high happens by chance with probability < 1e-15


def key_from(keys: Any) -> bytes:
    """The licensor's fingerprint key from the keyring, created on first use."""
    value = keys.get(FINGERPRINT_KEY)
    if value is None:
        value = secrets.token_hex(32)
        keys.set(FINGERPRINT_KEY, value)
    return bytes.fromhex(value)


def _pattern(key: bytes, licence_id: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    seed = hmac.new(key, f"{licence_id}\x00{name}".encode(), hashlib.sha256).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
    return rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def _b_names(tensors: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(n for n in tensors if ".lora_B." in n)


def embed(blob: bytes | bytearray, key: bytes, licence_id: str) -> bytes:
    """A copy of ``blob`` (a vault adapter blob) with the fingerprint of ``licence_id`` in every lora_B.

    Raises:
        InvalidAdapterError: ``blob`` is not a vault adapter blob.
    """
    from vault.adapter import load_blob, make_blob

    tensors, meta = load_blob(blob)
    marked = dict(tensors)
    for name in _b_names(tensors):
        b = np.asarray(tensors[name], dtype=np.float64)
        rms = float(np.sqrt(np.mean(b * b))) or 1e-6
        marked[name] = (b + STRENGTH * rms * _pattern(key, licence_id, name, b.shape)).astype(tensors[name].dtype)
    return make_blob(marked, meta.peft_config, base_name=meta.base_name, base_sha256=meta.base_sha256,
                     created=meta.created)


def score(
    leaked: Mapping[str, np.ndarray], original: Mapping[str, np.ndarray], key: bytes, licence_id: str
) -> float:
    """z-score that ``leaked`` carries the fingerprint of ``licence_id`` (``original``: the unmarked weights).

    Only lora_B tensors present in both with equal shapes count; 0.0 when none do.
    """
    dot = norm2 = 0.0
    count = 0
    for name in _b_names(original):
        if name not in leaked or leaked[name].shape != original[name].shape:
            continue
        delta = np.asarray(leaked[name], dtype=np.float64) - np.asarray(original[name], dtype=np.float64)
        pattern = _pattern(key, licence_id, name, delta.shape)
        dot += float(np.sum(delta * pattern))
        norm2 += float(np.sum(delta * delta))
        count += delta.size
    if count == 0 or norm2 == 0.0:
        return 0.0
    # correlation of delta with a +/-1 pattern, scaled by sqrt(n): ~N(0, 1) for an unrelated pattern
    return float(dot / np.sqrt(norm2 * count) * np.sqrt(count))


@dataclass(frozen=True)
class Trace:
    """How strongly a suspect adapter carries the fingerprint of one licence issued for the adapter."""

    licence_id: str
    licensee: str
    issued: str
    z: float

    @property
    def match(self) -> bool:
        return bool(self.z >= MATCH_Z)

    def to_json(self) -> dict[str, Any]:
        return {"licence_id": self.licence_id, "licensee": self.licensee, "issued": self.issued,
                "z": round(float(self.z), 2), "match": self.match}


def trace(vault: Any, name: str, suspect: Path | str) -> list[Trace]:
    """Score a suspect adapter (PEFT dir or GGUF LoRA) against every licence exported from ``name``.

    Returns:
        One :class:`Trace` per fingerprinted export of ``name``, highest z first.

    Raises:
        InvalidAdapterError: the suspect is not a readable adapter.
        UnknownNameError: no adapter ``name``.
    """
    from vault.adapter import load_blob, read_adapter

    entry = vault.get(name)
    leaked, _ = load_blob(read_adapter(suspect, base_name=entry.base_name).blob)
    key = key_from(vault.keys)
    original = vault.open(name)
    try:
        tensors, _ = load_blob(original)
        results = []
        for licence_id in vault.records(RECORD_KIND):
            raw = vault.open_record(RECORD_KIND, licence_id)
            record = json.loads(bytes(raw))
            if record.get("adapter") != name or record.get("adapter_sha256") != entry.sha256:
                continue
            lic = record["licence"]
            results.append(Trace(licence_id, lic["licensee"]["recipient"], lic["issued"],
                                 score(leaked, tensors, key, licence_id)))
        del tensors
    finally:
        original[:] = bytes(len(original))
    return sorted(results, key=lambda t: -t.z)
