"""VaultGuard: the real Guard (runtime/guard/base.py) the runtime talks to.

- ``screen_prompt``: the shipped screening classifier (runtime.guard.screen) on the last
  user turn in its context; every verdict is written to the audit log (hash, not text).
- ``screen_output``: the same classifier plus hazard-procedure patterns on the text
  generated so far; blocks are logged (passes are not: it runs every few tokens).
- ``audit_adapter``: delegates to runtime.guard.audit (static + behavioural check).

Nothing here runs through the base model or an adapter: the classifier has its own
weights, pinned by sha256, so an adapter cannot change what the guard sees.
"""

from __future__ import annotations

from typing import Any, Sequence

from runtime.guard.auditlog import AuditLog
from runtime.guard.base import AuditReport, Message, Verdict
from runtime.guard.screen import ScreenModel, _content, load_model, screen_messages, screen_text_output

__all__ = ["VaultGuard"]


class VaultGuard:
    """Prompt/output screening and adapter audit behind the Guard protocol.

    Args:
        vault: a ``vault.store.Vault`` (enables the audit's MACed cache and Entry updates).
        model: a screening model (default: the shipped, sha256-checked weights).
        log: the audit log (default: VAULT_HOME/logs/guard.log; text only with VAULT_LOG_PROMPTS=1).
        engine: a ``runtime.engine.Engine`` on the base, enabling the audit's behavioural check.

    Raises:
        GuardError: the weights are missing or fail their pinned sha256.
    """

    name = "vault-guard"

    def __init__(self, vault: Any = None, *, model: ScreenModel | None = None, log: AuditLog | None = None,
                 engine: Any = None) -> None:
        self.model = model or load_model()
        self.log = log or AuditLog()
        self.vault = vault
        self.engine = engine
        self.version = self.model.version

    def screen_prompt(self, messages: Sequence[Message]) -> Verdict:
        """Judge the last user turn in context; log the verdict and the turn's sha256."""
        verdict = screen_messages(self.model, messages)
        users = [m for m in messages if m.get("role") == "user"]
        self.log.record("prompt", verdict, _content(users[-1]) if users else "", turns=len(users))
        return verdict

    def screen_output(self, text: str, messages: Sequence[Message]) -> Verdict:
        """Judge generated text so far; only blocks are logged (this runs every few tokens)."""
        verdict = screen_text_output(self.model, text)
        if not verdict.allowed:
            self.log.record("output", verdict, text)
        return verdict

    def audit_adapter(self, adapter: Any, base: Any) -> AuditReport:
        """Run the adapter audit (runtime.guard.audit) and log its verdict.

        ``adapter`` is a ``runtime.loader.AdapterTensors`` (tensors, meta, name) or a plain
        mapping of PEFT tensor names to arrays.
        """
        from runtime.guard import audit

        tensors = getattr(adapter, "tensors", adapter)
        meta = getattr(adapter, "meta", None)
        name = getattr(adapter, "name", "") or None
        report = audit.audit_adapter(tensors, meta, base, vault=self.vault, engine=self.engine, name=name)
        self.log.record_event("audit", {"adapter": name, "verdict": report.verdict, "cached": report.cached,
                                        "base_sha256": getattr(base, "sha256", None)})
        return report
