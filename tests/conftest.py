"""Fixtures every test module shares (see tests/support.py for the helpers behind them)."""
from __future__ import annotations

import pytest

from tests.support import SMTPSink, make_node


@pytest.fixture
def node(tmp_path):
    """One node, ``n1``, with its own var/ under tmp_path and test-friendly timings."""
    return make_node(tmp_path, "n1")


@pytest.fixture
def settings(node):
    return node.settings()


@pytest.fixture
def sink():
    """An SMTP sink on a free loopback port (``sink.port``), stopped after the test."""
    with SMTPSink() as s:
        yield s
