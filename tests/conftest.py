"""Fixtures every test module shares (see tests/support.py for the helpers behind them)."""
from __future__ import annotations

import json

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


@pytest.fixture
def master():
    """``master(node)`` runs ``mailqctl start`` for *node*; each master is stopped (and gone) after the test."""
    from mailq.fsutil import pid_alive

    nodes = []

    def start(node):
        result = node.run("mailqctl", "start")
        assert result.returncode == 0, result.stderr
        nodes.append(node)

    yield start
    for node in nodes:
        pid = json.loads(node.run("mailqctl", "status", "--json").stdout)["pid"]
        node.run("mailqctl", "stop", "--timeout", "120")
        assert pid is None or not pid_alive(pid)
