"""Sealed adapter -> running engine, with the plaintext only ever in this process's memory.

    vault.open(name)            age-decrypts into a bytearray (mlocked here)
    adapter.load_blob           read-only numpy views into that bytearray
    base check                  the adapter's recorded base sha256 must equal the engine's base
    guard.audit_adapter         before anything reaches llama.cpp ("reject" -> AuditRejectedError)
    lora_gguf.convert           GGUF LoRA serialised into a second bytearray (mlocked)
    memfd                       sealed, close-on-exec memory file; llama.cpp reads /proc/self/fd/N
    engine.load_adapter         llama.cpp copies the tensors into its own buffers
    zero                        the memfd is closed, both bytearrays are overwritten with zeros
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from runtime import lora_gguf, memfd
from runtime.engine import Engine
from runtime.guard.base import AuditReport, Guard, PassThroughGuard
from runtime.models import BaseModel, resolve
from vault.errors import AuditRejectedError, BaseModelError
from vault.paths import vault_home

__all__ = ["AdapterTensors", "AttachReport", "open_engine", "attach", "attach_blob", "default_guard",
           "guard_is_passthrough", "hardening"]

Progress = Callable[[str], None]
_hardening: memfd.Hardening | None = None


@dataclass(frozen=True)
class AdapterTensors(Mapping):
    """What the guard's ``audit_adapter`` receives: PEFT name -> array, plus the adapter's metadata."""

    tensors: Mapping[str, np.ndarray]
    meta: Any  # vault.adapter.AdapterMeta
    name: str = ""

    @property
    def peft_config(self) -> dict:
        return dict(self.meta.peft_config)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True)
class AttachReport:
    name: str
    audit: AuditReport
    seconds: float
    gguf_bytes: int
    locked: bool            # whether mlock succeeded on the plaintext buffers
    details: dict = field(default_factory=dict)


def hardening() -> memfd.Hardening:
    """Harden this process once (no core dumps, not dumpable) and return what succeeded."""
    global _hardening
    if _hardening is None:
        _hardening = memfd.harden()
    return _hardening


def default_guard(vault: Any = None, *, engine: Engine | None = None) -> Guard:
    """The real guard (runtime.guard.default_guard) when it exists, else the pass-through.

    ``engine`` (the base, loaded) lets the real guard's audit run its behavioural check.
    """
    try:
        from runtime.guard import default_guard as real  # type: ignore[attr-defined]
    except ImportError:
        return PassThroughGuard()
    return real(vault) if engine is None else real(vault, engine=engine)


def guard_is_passthrough() -> bool:
    try:
        from runtime.guard import default_guard as _  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        return True
    return False


def open_engine(base: str | Path | None = None, *, progress: Progress | None = None, **kwargs: Any) -> Engine:
    """Harden the process and load the base model (None: the embedded default)."""
    hardening()
    model: BaseModel = resolve(None if base is None else str(base), cache_dir=vault_home())
    return Engine(model, progress=progress, **kwargs)


def attach(engine: Engine, vault: Any, name: str, *, guard: Guard, progress: Progress | None = None,
           use: str = "chat") -> AttachReport:
    """Decrypt adapter ``name`` from ``vault`` into memory and load it into ``engine`` under ``name``.

    ``use`` is what the adapter is loaded for ("chat" for vault run, "serve" for vault serve): an
    adapter received under licence is refused before decryption if its licence forbids that use, has
    expired, or requires the guard while ``guard`` is the pass-through.

    Raises:
        LicenceError: the adapter's licence forbids this load.
        UnknownNameError, NoIdentityError, IntegrityError: from the store.
        BaseModelError: the adapter was sealed for another base model.
        AuditRejectedError: the guard rejected the adapter.
        InvalidAdapterError, EngineError: conversion or llama.cpp refused it.
    """
    from vault.licence import enforce

    enforce(vault.get(name), use, guard_enabled=not isinstance(guard, PassThroughGuard))
    if progress:
        progress(f"decrypting {name} into memory")
    blob = vault.open(name)
    try:
        return attach_blob(engine, blob, name, guard=guard, progress=progress)
    finally:
        memfd.zero(blob)
        memfd.unlock_buffer(blob)


def attach_blob(engine: Engine, blob: bytearray, name: str, *, guard: Guard,
                progress: Progress | None = None) -> AttachReport:
    """:func:`attach` for an already-decrypted blob (zeroing it stays the caller's job)."""
    from vault.adapter import load_blob

    start = time.perf_counter()
    locked = memfd.lock_buffer(blob)
    tensors, meta = load_blob(blob)
    if meta.base_sha256 != engine.base.sha256:
        raise BaseModelError(
            f"adapter {name!r} was sealed for base {meta.base_name} (sha256 {meta.base_sha256[:12]}...), "
            f"not {engine.base.name} (sha256 {engine.base.sha256[:12]}...); run it with that base (--base)")
    report = guard.audit_adapter(AdapterTensors(tensors, meta, name), engine.base)
    # an owner's `vault audit --force` is recorded in the report (never possible under licence)
    if report.verdict == "reject" and not report.details.get("forced"):
        raise AuditRejectedError(f"the adapter audit rejected {name!r}: {'; '.join(report.reasons) or 'no reason'}")
    if progress:
        progress(f"converting {name} to a GGUF LoRA in memory")
    gguf_buf = lora_gguf.convert(tensors, meta.peft_config, n_head=engine.n_head, n_head_kv=engine.n_head_kv,
                                 architecture=engine.architecture)
    try:
        locked = memfd.lock_buffer(gguf_buf) and locked
        with memfd.MemFile(gguf_buf, name="vault-adapter") as mem:
            engine.load_adapter(name, mem.path)
        size = len(gguf_buf)
    finally:
        memfd.zero(gguf_buf)
        memfd.unlock_buffer(gguf_buf)
    del tensors
    return AttachReport(name, report, time.perf_counter() - start, size, locked,
                        {"hardening": hardening().to_json()})
