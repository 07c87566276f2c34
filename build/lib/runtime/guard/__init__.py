"""The guard: prompt and output screening and the adapter audit (see base.py for the protocol)."""

from __future__ import annotations

from typing import Any

from runtime.guard.base import AuditReport, Guard, PassThroughGuard, Verdict

__all__ = ["AuditReport", "Guard", "PassThroughGuard", "Verdict", "default_guard"]


def default_guard(vault: Any = None, *, engine: Any = None) -> Guard:
    """The real guard: the shipped screening classifier (sha256-checked) and the adapter audit.

    Args:
        vault: a ``vault.store.Vault``; enables the audit's MACed verdict cache and Entry updates.
        engine: a ``runtime.engine.Engine`` on the base; enables the audit's behavioural check.

    Raises:
        GuardError: the guard's weights are missing or do not match their pinned sha256.
    """
    from runtime.guard.guard import VaultGuard

    return VaultGuard(vault, engine=engine)
