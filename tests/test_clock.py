"""`mailq.clock`: MAILQ_NOW moves the clock of date-based decisions, in this process and in children."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from mailq import clock
from tests.support import ROOT


def test_unset_is_the_real_clock(monkeypatch):
    monkeypatch.delenv(clock.ENV, raising=False)
    before = time.time()
    assert before <= clock.now() <= time.time()


@pytest.mark.parametrize("text, expected", [
    ("1796000000", 1796000000.0),
    ("1796000000.25", 1796000000.25),
    ("2026-12-14", 1797206400.0),
    ("2026-12-14T09:30:00Z", 1797206400.0 + 9.5 * 3600),
    ("2026-12-14T10:30:00+01:00", 1797206400.0 + 9.5 * 3600),
])
def test_epoch_and_iso_forms(monkeypatch, text, expected):
    monkeypatch.setenv(clock.ENV, text)
    assert clock.now() == expected


def test_day_is_the_utc_calendar_day():
    assert clock.day(1797206400.0 - 1) == "2026-12-13"
    assert clock.day(1797206400.0) == "2026-12-14"


def test_garbage_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv(clock.ENV, "next tuesday")
    with pytest.raises(ValueError, match="MAILQ_NOW='next tuesday'"):
        clock.now()


def test_a_child_process_sees_it():
    out = subprocess.run([sys.executable, "-c", "from mailq import clock; print(clock.day(clock.now()))"],
                         env={"MAILQ_NOW": "2027-01-31T23:59:59Z", "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "2027-01-31"
