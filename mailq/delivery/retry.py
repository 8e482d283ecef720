"""Retry policy for temporary delivery failures: exponential backoff and a give-up age.

The first retry waits ``delivery.retry_initial`` seconds; each further attempt doubles the wait up
to ``delivery.retry_max``. A recipient whose first failed attempt is older than
``delivery.give_up_after`` is given up: the list owner is told (``mailq.notices.notify``).
"""
from __future__ import annotations

from mailq.config import Settings


def next_attempt(settings: Settings, attempts: int) -> float:
    """Seconds to wait before attempt number *attempts* + 1 (``attempts`` failures so far, >= 1)."""
    d = settings.delivery
    n = max(1, attempts)
    # Cap the exponent: 2**n overflows float long before it matters.
    return min(d.retry_max, d.retry_initial * (2.0 ** min(n - 1, 60)))


def should_give_up(settings: Settings, first_attempt: float, now: float) -> bool:
    """True once temporary failures have lasted ``delivery.give_up_after`` seconds."""
    return now - first_attempt >= settings.delivery.give_up_after
