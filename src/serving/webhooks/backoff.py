"""When a failed delivery is tried again: exponential backoff with equal jitter."""

from __future__ import annotations


def backoff_s(failed_attempts: int, base_s: float, max_s: float, jitter: float) -> float:
    """The wait after the ``failed_attempts``-th failure in a row (1-based): ``base_s · 2^(n−1)`` capped at
    ``max_s``, of which the first half is fixed and the second half scaled by ``jitter`` (0 ≤ jitter < 1, e.g.
    ``random.random()``), so replicas retrying many endpoints at once spread out but never retry early."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(failed_attempts, 1) - 1, 64))
    return ceiling / 2 + jitter * ceiling / 2
