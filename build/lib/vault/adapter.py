"""Read, validate and serialize LoRA adapters: the plaintext that vault seals.

An adapter enters vault as a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``)
or a llama.cpp GGUF LoRA file, and leaves this module as ONE safetensors blob (the sealed payload):
PEFT tensor names, dtypes f16/f32 (bf16 is widened to f32, losslessly), and string metadata
``format``, ``peft_config``, ``base_name``, ``base_sha256``, ``created``. The blob is the stock
safetensors format, so ``age -d`` plus ``safetensors.numpy.load`` gets the adapter back with no vault code.

Everything read here is untrusted: sizes are capped before anything is parsed, the safetensors header
is parsed strictly (no duplicate keys, no gaps or overlaps, offsets inside the buffer), and each
tensor is checked (known LoRA names, complete A/B pairs, shapes consistent with ``r`` and across
layers, finite values). A rejection is an :class:`InvalidAdapterError` with one precise line.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from vault.adapter_names import gguf_to_peft_name, parse_peft_name
from vault.errors import InvalidAdapterError

__all__ = [
    "AdapterBlob",
    "AdapterMeta",
    "FORMAT",
    "MAX_ADAPTER_BYTES",
    "read_adapter",
    "declared_base",
    "make_blob",
    "load_blob",
]

FORMAT = "vault-adapter/1"
FORMAT_VERSION = 1
MAX_ADAPTER_BYTES = 2 << 30  # a rank-64 LoRA of an 8B model is ~350 MB; 2 GiB is generous
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 8192
MAX_RANK = 1024
MAX_DIM = 1 << 18
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "BF16": np.dtype("<u2")}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AdapterMeta:
    """What an adapter says about itself (from the blob's safetensors metadata)."""

    peft_config: dict[str, Any]
    base_name: str
    base_sha256: str
    created: str
    format_version: int
    r: int
    alpha: float
    target_modules: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AdapterBlob:
    """A validated adapter as the bytes that get sealed, plus its metadata."""

    blob: bytes
    meta: AdapterMeta


def _bad(reason: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"invalid adapter: {reason}")


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- safetensors parsing


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(f"duplicate key {key[:80]!r} in a JSON header")
        out[key] = value
    return out


def _parse_safetensors(buf: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Strictly parse a safetensors buffer into read-only numpy views of it, plus its metadata."""
    view = memoryview(buf).cast("B")
    if len(view) < 8:
        raise _bad("safetensors file is shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(view):
        raise _bad(f"safetensors header length {header_len} is out of bounds")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, InvalidAdapterError):
            raise
        raise _bad("safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("safetensors __metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _bad(f"too many tensors ({len(header)} > {MAX_TENSORS})")
    data = view[8 + header_len :]
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name[:80]!r} has a malformed header entry")
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise _bad(f"tensor {name[:80]!r} has dtype {str(info['dtype'])[:10]}; only F16, BF16 and F32 are accepted")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
            raise _bad(f"tensor {name[:80]!r} has an invalid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _bad(f"tensor {name[:80]!r} has invalid data offsets")
        begin, end = offsets
        if not 0 <= begin <= end <= len(data) or end - begin != math.prod(shape) * dtype.itemsize:
            raise _bad(f"tensor {name[:80]!r} data offsets do not match its shape or lie outside the file")
        spans.append((begin, end, name))
        array = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
        array.flags.writeable = False
        if info["dtype"] == "BF16":  # numpy has no bfloat16: widen to f32 exactly (bf16 = top half of f32)
            array = (array.astype("<u4") << 16).view("<f4")
        tensors[name] = array
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise _bad(f"tensor {name[:80]!r} overlaps another or leaves a gap in the data section")
        position = end
    if position != len(data):
        raise _bad("trailing bytes after the last tensor")
    return tensors, metadata


# --------------------------------------------------------------------------- validation


def _validate_config(cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise _bad(f"{CONFIG_FILE} is not a JSON object")
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _bad(f"peft_type is {str(peft_type)[:20]!r}; only LORA adapters are supported")
    r = cfg.get("r")
    if type(r) is not int or not 1 <= r <= MAX_RANK:
        raise _bad(f"'r' must be an integer in 1..{MAX_RANK}")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise _bad("'lora_alpha' must be a positive finite number")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise _bad("'target_modules' must be a list of module names or a regex string")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise _bad("'target_modules' must contain only strings")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise _bad("'base_model_name_or_path' must be a string")
    for unsupported in ("use_dora", "modules_to_save"):
        if cfg.get(unsupported):
            raise _bad(f"'{unsupported}' is not supported (only plain LoRA A/B pairs)")
    return cfg


def _canonical(tensors: dict[str, np.ndarray], cfg: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Check every LoRA tensor and return them under canonical PEFT names, plus the targeted modules."""
    if not tensors:
        raise _bad("the adapter has no tensors")
    rank_pattern = cfg.get("rank_pattern") or {}
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        parsed = parse_peft_name(name)
        if parsed is None:
            raise _bad(f"unsupported tensor {name[:120]!r} (only LoRA A/B weights of attention and MLP projections)")
        layer, module, ab = parsed
        if ab in pairs.setdefault((layer, module), {}):
            raise _bad(f"tensor for layer {layer} {module} lora_{ab} appears twice")
        if array.ndim != 2:
            raise _bad(f"{name[:120]!r} must be 2-D, got shape {tuple(array.shape)}")
        pairs[(layer, module)][ab] = array
    out: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for (layer, module), pair in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise _bad(f"{where}: lora_{'B' if 'A' in pair else 'A'} is missing (A/B pairs must be complete)")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise _bad(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on the rank")
        if rank != cfg["r"] and not rank_pattern:
            raise _bad(f"{where}: rank {rank} does not match r={cfg['r']} in the config")
        if not 1 <= rank <= MAX_RANK or 0 in a.shape or 0 in b.shape:
            raise _bad(f"{where}: empty or oversized tensor")
        io = (a.shape[1], b.shape[0])
        if shapes.setdefault(module, io) != io:
            raise _bad(f"{where}: in/out {io} differs from other layers' {shapes[module]}")
        for ab, array in (("A", a), ("B", b)):
            if not np.isfinite(array).all():
                raise _bad(f"{where} lora_{ab} contains NaN or infinity")
            dtype = np.float16 if array.dtype == np.float16 else np.float32
            out[f"base_model.model.model.layers.{layer}.{module}.lora_{ab}.weight"] = np.ascontiguousarray(
                array, dtype=dtype
            )
    present = sorted({module.split(".")[1] for _, module in pairs})
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and targets:
        missing = [m for m in present if m not in targets]
        if missing:
            raise _bad(f"tensors for {', '.join(missing)} but target_modules does not list them")
    return out, present


def _meta(cfg: dict[str, Any], *, base_name: str, base_sha256: str, created: str, present: list[str]) -> AdapterMeta:
    return AdapterMeta(
        peft_config=cfg,
        base_name=base_name,
        base_sha256=base_sha256,
        created=created,
        format_version=FORMAT_VERSION,
        r=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        target_modules=present,
    )


def _check_base(base_name: str | None, base_sha256: str | None) -> tuple[str, str]:
    if not base_name:
        raise _bad("it declares no base model (base_model_name_or_path); pass the base explicitly (--base)")
    if len(base_name) > 512 or not base_name.isprintable():
        raise _bad("the base model name is too long or not printable")
    if base_sha256 is None:
        base_sha256 = ""
    if base_sha256 and not _SHA256_RE.match(base_sha256):
        raise ValueError("base_sha256 must be 64 lowercase hex digits")
    return base_name, base_sha256


# --------------------------------------------------------------------------- public API


def make_blob(
    tensors: dict[str, np.ndarray],
    peft_config: dict[str, Any],
    *,
    base_name: str,
    base_sha256: str,
    created: str | None = None,
) -> bytes:
    """Validate LoRA tensors and serialize them with their metadata as one safetensors blob.

    Args:
        tensors: PEFT-named LoRA weights (lora_A ``(r, in)``, lora_B ``(out, r)``), f16/f32.
        peft_config: the content of ``adapter_config.json``.
        base_name, base_sha256: the base model the adapter was made for (sha256 of its GGUF, or "").
        created: ISO-8601 UTC; default now.

    Raises:
        InvalidAdapterError: the tensors or the config do not form a valid LoRA adapter.
    """
    cfg = _validate_config(peft_config)
    base_name, base_sha256 = _check_base(base_name, base_sha256)
    canonical, _ = _canonical(dict(tensors), cfg)
    return _serialize(canonical, cfg, base_name=base_name, base_sha256=base_sha256, created=created)


def _serialize(
    canonical: dict[str, np.ndarray], cfg: dict[str, Any], *, base_name: str, base_sha256: str, created: str | None
) -> bytes:
    metadata = {
        "format": FORMAT,
        "peft_config": json.dumps(cfg, sort_keys=True, separators=(",", ":")),
        "base_name": base_name,
        "base_sha256": base_sha256,
        "created": created or _now(),
    }
    return safetensors.numpy.save(canonical, metadata=metadata)


def load_blob(blob: bytes | bytearray | memoryview) -> tuple[dict[str, np.ndarray], AdapterMeta]:
    """Parse and validate a blob made by :func:`make_blob`, without copying the tensor data.

    The arrays are read-only views into ``blob`` (bf16 would be widened copies, but blobs hold only
    f16/f32): they stay valid as long as ``blob`` does, and read as zeros once the caller zeroes it.

    Raises:
        InvalidAdapterError: not a vault adapter blob, or its tensors fail validation.
    """
    tensors, metadata = _parse_safetensors(blob)
    if metadata.get("format") != FORMAT:
        raise _bad(f"not a {FORMAT} blob (format={metadata.get('format', '')[:40]!r})")
    try:
        cfg = json.loads(metadata.get("peft_config", ""), object_pairs_hook=_no_duplicates)
    except ValueError:
        raise _bad("the blob's peft_config is not valid JSON") from None
    cfg = _validate_config(cfg)
    base_name, base_sha256 = _check_base(metadata.get("base_name"), metadata.get("base_sha256", ""))
    _, present = _canonical(tensors, cfg)
    created = metadata.get("created", "")
    return tensors, _meta(cfg, base_name=base_name, base_sha256=base_sha256, created=created, present=present)


def declared_base(path: Path | str) -> str | None:
    """The base model an adapter declares (PEFT ``base_model_name_or_path`` / GGUF base model name), if any.

    Raises:
        InvalidAdapterError: ``path`` is not a readable PEFT directory or GGUF file.
    """
    path = Path(path)
    if path.is_dir():
        base = _read_peft_config(path).get("base_model_name_or_path")
        return base or None
    return _read_gguf(path)[2]


def read_adapter(
    path: Path | str,
    *,
    base_name: str | None = None,
    base_sha256: str | None = None,
    created: str | None = None,
) -> AdapterBlob:
    """Read and validate a PEFT adapter directory or a GGUF LoRA file into a sealable blob.

    Args:
        path: the PEFT directory or ``.gguf`` file.
        base_name: overrides the base the adapter declares (required if it declares none).
        base_sha256: the sha256 of the base GGUF the adapter is bound to ("" or None if unknown).
        created: ISO-8601 UTC creation time; default now.

    Raises:
        InvalidAdapterError: with one precise line saying what is wrong.
    """
    path = Path(path)
    if path.is_dir():
        cfg = _read_peft_config(path)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            if (path / "adapter_model.bin").exists():
                raise _bad("adapter_model.bin (pickle) is not accepted; save the adapter with safe_serialization=True")
            raise _bad(f"{WEIGHTS_FILE} is missing in {path}")
        raw = _read_capped(weights, MAX_ADAPTER_BYTES)
        tensors, _ = _parse_safetensors(raw)
    elif path.is_file():
        tensors, cfg, gguf_base = _read_gguf(path)
        cfg = dict(cfg, base_model_name_or_path=gguf_base) if gguf_base else cfg
    else:
        raise _bad(f"{path} is neither a PEFT adapter directory nor a GGUF LoRA file")
    cfg = _validate_config(cfg)
    base_name, base_sha256 = _check_base(base_name or cfg.get("base_model_name_or_path"), base_sha256)
    created = created or _now()
    canonical, present = _canonical(tensors, cfg)
    blob = _serialize(canonical, cfg, base_name=base_name, base_sha256=base_sha256, created=created)
    return AdapterBlob(blob, _meta(cfg, base_name=base_name, base_sha256=base_sha256, created=created, present=present))


def _read_capped(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise _bad(f"{path.name} is {size} bytes, over the {limit}-byte limit")
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise _bad(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise _bad(f"{path.name} grew past the {limit}-byte limit while being read")
    return data


def _read_peft_config(directory: Path) -> dict[str, Any]:
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise _bad(f"{CONFIG_FILE} is missing in {directory}")
    try:
        cfg = json.loads(_read_capped(config, MAX_CONFIG_BYTES).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, InvalidAdapterError):
            raise
        raise _bad(f"{CONFIG_FILE} is not valid JSON") from None
    return _validate_config(cfg)


def _gguf_value(reader: Any, key: str) -> Any:
    field_ = reader.fields.get(key)
    return None if field_ is None else field_.contents()


def _read_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], str | None]:
    """Tensors (PEFT names), a synthesized PEFT config, and the declared base of a GGUF LoRA."""
    import gguf  # imported here: `vault list` should not pay for it

    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _bad(f"cannot read {path}: {exc.strerror or exc}") from None
    if size > MAX_ADAPTER_BYTES:
        raise _bad(f"{path.name} is {size} bytes, over the {MAX_ADAPTER_BYTES}-byte limit")
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise _bad(f"{path.name} is not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(path)
        gtype = _gguf_value(reader, "general.type")
        atype = _gguf_value(reader, "adapter.type")
        alpha = _gguf_value(reader, "adapter.lora.alpha")
        base = _gguf_value(reader, "general.base_model.0.name")
        raw_tensors = list(reader.tensors)
    except (ValueError, KeyError, IndexError, TypeError, struct.error, OSError) as exc:
        raise _bad(f"{path.name} is not a readable GGUF file ({type(exc).__name__})") from None
    if gtype != "adapter" or atype != "lora":
        raise _bad(f"{path.name} is a GGUF but not a LoRA adapter (general.type={gtype!r}, adapter.type={atype!r})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise _bad("adapter.lora.alpha is missing or not a number")
    if len(raw_tensors) > MAX_TENSORS:
        raise _bad(f"too many tensors ({len(raw_tensors)} > {MAX_TENSORS})")
    allowed = {
        gguf.GGMLQuantizationType.F32: np.dtype("<f4"),
        gguf.GGMLQuantizationType.F16: np.dtype("<f2"),
        gguf.GGMLQuantizationType.BF16: np.dtype("<u2"),
    }
    tensors: dict[str, np.ndarray] = {}
    for t in raw_tensors:
        try:
            name = gguf_to_peft_name(t.name)
        except ValueError:
            raise _bad(f"unsupported GGUF tensor {t.name[:120]!r}") from None
        dtype = allowed.get(t.tensor_type)
        if dtype is None:
            raise _bad(f"{t.name}: tensor type {getattr(t.tensor_type, 'name', t.tensor_type)} is not F32/F16/BF16")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne0 is the fastest dim
        array = np.frombuffer(t.data.tobytes(), dtype=dtype).reshape(shape)
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            array = (array.astype("<u4") << 16).view("<f4")
        tensors[name] = array
    ranks = {a.shape[0] for n, a in tensors.items() if n.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise _bad(f"the GGUF LoRA tensors must share one rank, found {sorted(ranks) or 'none'}")
    modules = sorted({n.split(".")[-3] for n in tensors})
    cfg = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": float(alpha), "target_modules": modules}
    return tensors, cfg, (base if isinstance(base, str) and base else None)
