"""The one Guard protocol the runtime talks to; how the guard decides is hidden behind it.

Contract (shared by runtime/chat.py, runtime/server.py and the guard implementation):

- ``screen_prompt(messages)``: the whole conversation so far (OpenAI-style dicts with
  ``role`` and ``content``), the last user turn being the one to judge in context.
- ``screen_output(text, messages)``: the text generated so far for this turn; called
  every N tokens while streaming and once at the end.
- ``audit_adapter(adapter, base)``: before an adapter is first loaded. ``adapter`` is
  an ``AdapterTensors`` mapping of PEFT tensor names to numpy arrays plus its config;
  ``base`` is the base model record. Returns an ``AuditReport``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["Verdict", "AuditReport", "Guard", "PassThroughGuard", "Message"]

Message = Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    """A screening decision. ``category`` is an MLCommons hazard id (e.g. "S2") when blocked."""

    allowed: bool
    category: str | None = None
    score: float = 0.0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "category": self.category, "score": round(float(self.score), 4)}


@dataclass(frozen=True)
class AuditReport:
    """Result of an adapter audit: verdict is "pass", "warn" or "reject"."""

    verdict: str
    reasons: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), "details": self.details, "cached": self.cached}


@runtime_checkable
class Guard(Protocol):
    name: str
    version: str

    def screen_prompt(self, messages: Sequence[Message]) -> Verdict: ...

    def screen_output(self, text: str, messages: Sequence[Message]) -> Verdict: ...

    def audit_adapter(self, adapter: Any, base: Any) -> AuditReport: ...


class PassThroughGuard:
    """Allows everything. Only for tests and for explicit, logged owner overrides."""

    name = "pass-through"
    version = "0"

    def screen_prompt(self, messages: Sequence[Message]) -> Verdict:
        return Verdict(allowed=True)

    def screen_output(self, text: str, messages: Sequence[Message]) -> Verdict:
        return Verdict(allowed=True)

    def audit_adapter(self, adapter: Any, base: Any) -> AuditReport:
        return AuditReport(verdict="pass", reasons=("pass-through guard: no audit performed",))
