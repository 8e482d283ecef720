"""The wall clock for date-based decisions, and the one way tests move it: ``MAILQ_NOW``.

Scheduled tasks and the runners that decide by the calendar (bounce scores counted once a day,
warnings every N days, stale bounce information) take the time from ``now()``, never from
``time.time()`` directly, so a test can run ``mailqctl cron run TASK`` (or start a runner) "ten
days later" without waiting or patching code.  Set the environment variable ``MAILQ_NOW`` of the
process to the moment it should see:

* epoch seconds: ``MAILQ_NOW=1796000000`` (fractions allowed), or
* an ISO 8601 date or time: ``MAILQ_NOW=2026-12-14`` (midnight UTC), ``MAILQ_NOW=2026-12-14T09:30:00Z``
  (a time without an offset is UTC).

It is read on every call, so it reaches the processes a master starts and can change between
calls in one test process.  It only moves *decisions*: file times, lock claims, heartbeats, cron
stamps and queue due-times stay on the real clocks (docs/cluster.md §2: no ownership decision depends on
a wall clock), so a test that runs a task again sooner than its period still passes ``--force``.
An unparsable value raises ``ValueError`` naming the variable: a test that meant to move the clock
must not silently run on today.  Production never sets it.  docs/cluster.md §7 documents it.
"""
from __future__ import annotations

import datetime as _dt
import functools
import os
import time

#: The environment variable that fixes the clock (tests only).
ENV = "MAILQ_NOW"


def parse(text: str) -> float:
    """``"1796000000.5"`` or ``"2026-12-14"`` / ``"2026-12-14T09:30:00+01:00"`` -> epoch seconds."""
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected epoch seconds or an ISO 8601 date/time "
                         f"such as 2026-12-14 or 2026-12-14T09:30:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.timestamp()


def now() -> float:
    """Seconds since the epoch: ``MAILQ_NOW`` when set (tests), else ``time.time()``."""
    fixed = os.environ.get(ENV)
    if fixed:
        return parse(fixed)
    return time.time()


def day(when: float) -> str:
    """The calendar day (UTC) of *when*, as ``YYYY-MM-DD``: the unit of "once per day" counting."""
    return _day(int(when // 86400))


@functools.lru_cache(maxsize=16)
def _day(number: int) -> str:
    # POSIX time has exactly 86,400 seconds a day: the day number names the UTC date (a bounce storm
    # asks for the same few days thousands of times).
    return time.strftime("%Y-%m-%d", time.gmtime(number * 86400))
