"""The guard: prompt and output screening and the adapter audit (see base.py for the protocol)."""

from runtime.guard.base import AuditReport, Guard, PassThroughGuard, Verdict

__all__ = ["AuditReport", "Guard", "PassThroughGuard", "Verdict"]
