"""Prometheus metrics of the admission guardrails (default registry: `keyless operator` serves it on
--metrics-listen, `python -m keyless.webhooks` on its own --metrics-listen)."""
from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter("keyless_webhooks_decisions", "Guardrail decisions on Applications and ApplicationSets, "
                    "by kind, decision (allowed or denied) and reason.", ["kind", "decision", "reason"])


def observe(kind: str, allowed: bool, reason: str) -> None:
    DECISIONS.labels(kind, "allowed" if allowed else "denied", reason).inc()
