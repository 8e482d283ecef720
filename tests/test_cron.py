"""`mailq cron`: each task once per period across the cluster, node tasks once per node (docs/cluster.md §7)."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest

from mailq.cluster import heartbeat
from mailq.cluster.slicemap import load_map
from tests.support import ROOT, make_node


@pytest.fixture
def nodes(tmp_path):
    var = tmp_path / "var"
    return {n: make_node(tmp_path, n, var=var, cluster={"failover": "auto"}) for n in ("h1", "h2", "h3")}


def run(node, *args):
    result = node.mailq("cron", "run", *args, "--json")
    assert result.returncode in (0, 75), result.stderr
    return json.loads(result.stdout) if result.returncode == 0 else {"ran": False, "busy": True}


def test_a_cluster_task_runs_once_per_period_across_nodes(nodes):
    first = run(nodes["h1"], "expire-held")
    assert first["ran"] and first["ok"]
    second = run(nodes["h2"], "expire-held")
    assert not second["ran"] and re.search(r"ran \d+s ago on h1", second["summary"])
    forced = run(nodes["h2"], "expire-held", "--force")
    assert forced["ran"]
    listing = json.loads(nodes["h3"].mailq("cron", "list", "--json", check=True).stdout)
    row = next(r for r in listing if r["task"] == "expire-held")
    assert row["last_node"] == "h2" and row["last_age"] is not None


def test_a_node_task_runs_on_every_node(nodes):
    assert run(nodes["h1"], "recover")["ran"]
    assert run(nodes["h2"], "recover")["ran"]
    assert not run(nodes["h1"], "recover")["ran"]


def test_simultaneous_runs_on_two_nodes_run_the_task_once(nodes):
    procs = [subprocess.Popen([sys.executable, "-m", "mailq.cli.main", "cron", "run", "expire-held", "--json"],
                              cwd=ROOT, env=nodes[n].environ(), stdout=subprocess.PIPE) for n in ("h1", "h2", "h3")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    ran = [json.loads(o)["ran"] for p, o in zip(procs, outs, strict=True) if p.returncode == 0]
    assert all(p.returncode in (0, 75) for p in procs)
    assert ran.count(True) == 1


def test_check_failover_from_cron_takes_over_a_silent_node(nodes):
    nodes["h1"].mailq("slices", "init", "--nodes", "h1,h2", check=True)
    settings = nodes["h3"].settings()
    assert heartbeat.Heartbeat(nodes["h1"].settings()).renew()
    path = heartbeat.nodes_dir(settings) / "h2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    now = heartbeat.fs_now(settings)
    os.utime(path, (now - 60, now - 60))
    result = run(nodes["h3"], "check-failover")
    assert result["ran"] and "fenced h2" in result["summary"]
    smap = load_map(settings.slice_map_path)
    assert smap.nodes["h2"].fenced and smap.slices_for("h1")


def test_an_unknown_task_is_refused_with_the_known_ones(nodes):
    result = nodes["h1"].mailq("cron", "run", "nope")
    assert result.returncode == 1 and "expire-held" in result.stderr and "check-failover" in result.stderr
