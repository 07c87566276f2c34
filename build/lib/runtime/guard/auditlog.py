"""The guard's audit log: one JSON line per decision in ``VAULT_HOME/logs/guard.log`` (0600).

A line records when, what was screened (``prompt``, ``output``, ``audit``, ``override``),
the verdict, category and score, and the sha256 of the screened text. The text itself is
written only when the owner turns it on (``VAULT_LOG_PROMPTS=1`` or ``log_text=True``):
the log must not become a plaintext copy of private conversations.

Lines are appended with a single ``write`` on an ``O_APPEND`` descriptor, so concurrent
vault processes never interleave partial lines. The log is local and not tamper-evident:
it is for the owner, not a proof against the owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Mapping

from runtime.guard.base import Verdict
from vault.errors import GuardError
from vault.paths import vault_home

__all__ = ["AuditLog", "log_path", "prompt_logging_enabled"]

_MAX_TEXT = 20_000  # characters of text kept per line when text logging is on


def log_path(home: Path | None = None) -> Path:
    """Where the guard log lives for ``home`` (default: VAULT_HOME or the platform data dir)."""
    return (home or vault_home()) / "logs" / "guard.log"


def prompt_logging_enabled() -> bool:
    """True when VAULT_LOG_PROMPTS=1: the owner asked for prompt text in the log."""
    return os.environ.get("VAULT_LOG_PROMPTS", "") == "1"


class AuditLog:
    """Append-only JSON-lines log of guard decisions.

    Args:
        path: log file (default :func:`log_path`).
        log_text: also store the screened text; default from VAULT_LOG_PROMPTS.
        clock: injectable time source (seconds since the epoch) for deterministic tests.
    """

    def __init__(self, path: Path | None = None, *, log_text: bool | None = None, clock=time.time) -> None:
        self.path = path or log_path()
        self.log_text = prompt_logging_enabled() if log_text is None else log_text
        self._clock = clock

    def record(self, kind: str, verdict: Verdict, text: str, **extra: Any) -> dict[str, Any]:
        """Append one decision; returns the line written (as a dict).

        Raises:
            GuardError: the log cannot be written (a guard that cannot log does not screen).
        """
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock())),
            "kind": kind,
            **verdict.to_json(),
            "sha256": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        }
        entry.update(extra)
        if self.log_text:
            entry["text"] = text[:_MAX_TEXT]
        self._append(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        return entry

    def record_event(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Append a non-screening event (e.g. an owner's ``--force`` of a warned adapter)."""
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock())), "kind": kind, **fields}
        self._append(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")

    def _append(self, line: str) -> None:
        data = line.encode("utf-8", "surrogatepass")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                    os.fchmod(fd, 0o600)  # someone widened it; the log may hold hashes of private text
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise GuardError(f"failed to write the guard log {self.path}: {exc.strerror}") from None
