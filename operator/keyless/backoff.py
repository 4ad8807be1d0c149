"""Exponential back-off with jitter, for every retry loop of Keyless (agent, operator). Pure."""
from __future__ import annotations


def backoff_delay_seconds(attempt: int, jitter: float, base: float = 0.5, cap: float = 5.0) -> float:
    """Exponential backoff with "equal jitter": the delay for retry number `attempt` (1-based).

    `jitter` in [0, 1]: the delay lies between half and all of min(cap, base * 2**(attempt-1)), so
    retries never bunch up at zero and never exceed the cap.
    """
    attempt = max(1, attempt)
    ceiling = min(cap, base * (2 ** min(attempt - 1, 30)))
    jitter = max(0.0, min(1.0, jitter))
    return ceiling / 2 + ceiling / 2 * jitter
