"""PEFT LoRA tensors -> GGUF LoRA bytes, in memory, with numpy only (no torch, no file).

The GGUF is serialised here directly (``gguf`` supplies the constants and key names)
because ``gguf.GGUFWriter`` only writes to a path, and the whole point is that the
plaintext never reaches one. The result is a ``bytearray`` so the caller can zero it.

Orientation. PEFT stores ``lora_A`` as (r, in) and ``lora_B`` as (out, r); llama.cpp wants
ggml shapes ``lora_a = [in, r]`` and ``lora_b = [r, out]`` (ne0 first), which in row-major
numpy are the same (r, in) and (out, r) arrays. llama.cpp applies ``scale * alpha / r``
with r read from ``lora_a``'s rank dimension, so ``adapter.lora.alpha`` is PEFT's
``lora_alpha`` (times ``sqrt(r)`` for rsLoRA, whose scaling is alpha / sqrt(r)).

Rotary layout. llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` from
Hugging Face's rotate-half order into its interleaved order (``convert_hf_to_gguf.py``,
``LlamaModel.permute``). A LoRA on those modules adds ``B @ A`` to the *permuted* weight,
so ``lora_B``'s rows (the output dimension) get the same permutation. Missing it yields
an adapter that loads fine and silently computes something else; tests/test_lora_gguf.py
proves the layout numerically through llama.cpp.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Mapping

import gguf
import numpy as np

from vault.adapter_names import parse_peft_name, peft_to_gguf_name
from vault.errors import InvalidAdapterError

__all__ = ["convert", "permute_rows", "lora_alpha"]

_ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT
_F32 = int(gguf.GGMLQuantizationType.F32)
_MAX_RANK = 4096


def permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half row order -> llama.cpp interleaved order (llama.cpp's ``permute``)."""
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise InvalidAdapterError(f"cannot permute {rows} rows for {n_head} heads: shape does not match the base")
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def lora_alpha(peft_config: Mapping[str, Any]) -> float:
    """The GGUF ``adapter.lora.alpha`` that reproduces PEFT's scaling for this config.

    Raises:
        InvalidAdapterError: per-module rank or alpha patterns (one alpha per file in GGUF).
    """
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise InvalidAdapterError("adapters with per-module rank_pattern/alpha_pattern are not supported")
    try:
        r = int(peft_config["r"])
        alpha = float(peft_config.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidAdapterError("adapter config has no valid 'r'/'lora_alpha'") from exc
    if not 0 < r <= _MAX_RANK or not math.isfinite(alpha):
        raise InvalidAdapterError(f"adapter rank {r} or alpha {alpha} out of range")
    return alpha * math.sqrt(r) if peft_config.get("use_rslora") else alpha


def _pairs(tensors: Mapping[str, np.ndarray], r: int) -> list[tuple[str, np.ndarray]]:
    """Validated (gguf_name, float32 array) in a stable order: layer, module, a before b."""
    out: list[tuple[tuple[int, str, str], str, np.ndarray]] = []
    unknown = 0
    for name, array in tensors.items():
        parsed = parse_peft_name(name)
        if parsed is None:
            unknown += 1
            continue
        arr = np.asarray(array)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise InvalidAdapterError(f"LoRA tensor {name} must be a 2-D float matrix")
        rank_dim = arr.shape[0] if parsed[2] == "A" else arr.shape[1]
        if rank_dim != r:
            raise InvalidAdapterError(f"LoRA tensor {name} has rank {rank_dim}, config says r={r}")
        out.append((parsed, peft_to_gguf_name(name), arr))
    if unknown:
        raise InvalidAdapterError(f"{unknown} adapter tensors are not LoRA pairs on llama attention/MLP projections")
    keys = {p for p, _, _ in out}
    for layer, module, ab in keys:
        if (layer, module, "B" if ab == "A" else "A") not in keys:
            raise InvalidAdapterError(f"LoRA pair incomplete for layer {layer} {module}")
    if not out:
        raise InvalidAdapterError("the adapter has no LoRA tensors")
    out.sort(key=lambda item: item[0])
    return [(gname, arr) for _, gname, arr in out]


def _string(value: str) -> bytes:
    raw = value.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", int(gguf.GGUFValueType.STRING)) + _string(value)


def _kv_f32(key: str, value: float) -> bytes:
    return _string(key) + struct.pack("<I", int(gguf.GGUFValueType.FLOAT32)) + struct.pack("<f", value)


def convert(
    tensors: Mapping[str, np.ndarray],
    peft_config: Mapping[str, Any],
    *,
    n_head: int,
    n_head_kv: int,
    architecture: str = "llama",
) -> bytearray:
    """Serialise a PEFT LoRA as a GGUF LoRA adapter for llama.cpp, entirely in memory.

    Args:
        tensors: PEFT tensor names -> arrays (``lora_A`` (r, in), ``lora_B`` (out, r)).
        peft_config: the adapter_config.json dict (``r``, ``lora_alpha``, ``use_rslora``).
        n_head, n_head_kv: the base model's attention heads (for the q/k row permutation).
        architecture: the base's ``general.architecture``; llama.cpp refuses a mismatch.

    Returns:
        The GGUF file as a bytearray (zero it when done).

    Raises:
        InvalidAdapterError: unsupported tensors, ranks, shapes or config.
    """
    alpha = lora_alpha(peft_config)
    pairs = _pairs(tensors, int(peft_config["r"]))
    kvs = [
        _kv_string(gguf.Keys.General.ARCHITECTURE, architecture),
        _kv_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER),
        _kv_string(gguf.Keys.Adapter.TYPE, "lora"),
        _kv_f32(gguf.Keys.Adapter.LORA_ALPHA, alpha),
    ]
    infos: list[bytes] = []
    arrays: list[np.ndarray] = []
    temporaries: list[np.ndarray] = []  # plaintext copies made here: zeroed before returning
    offset = 0
    for name, src in pairs:
        arr = src
        if name.endswith(".lora_b") and (".attn_q." in name or ".attn_k." in name):
            arr = permute_rows(arr, n_head if ".attn_q." in name else n_head_kv)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.shares_memory(arr, src):
            temporaries.append(arr)
        dims = tuple(reversed(arr.shape))  # ggml ne0 is the fastest-moving (last numpy) dimension
        infos.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", _F32, offset))
        arrays.append(arr)
        offset += _padded(arr.nbytes)
    header = struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(infos), len(kvs))
    meta = header + b"".join(kvs) + b"".join(infos)
    data_start = _padded(len(meta))
    out = bytearray(data_start + offset)
    out[: len(meta)] = meta
    pos = data_start
    for arr in arrays:
        out[pos : pos + arr.nbytes] = arr.data.cast("B")  # no bytes copy: only zeroable buffers hold plaintext
        pos += _padded(arr.nbytes)
    for tmp in temporaries:
        tmp.fill(0)
    return out


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
