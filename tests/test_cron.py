"""`mailqctl cron`: each task once per period across the cluster, node tasks once per node (docs/cluster.md §7)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mailq import cron
from mailq.cluster import heartbeat
from mailq.cluster.slicemap import load_map
from tests.support import ROOT, make_node

#: what the test tasks below do on their next run, and what they saw while running
BEHAVIOUR = {"fail": False}
SEEN: list = []


def slow_task(settings, log) -> str:
    """A test task that records the stamp cron wrote for it (file content and mtime) while it runs."""
    path = cron.stamp_path(settings, cron.TASKS["slow"])
    SEEN.append((json.loads(path.read_text()), path.stat().st_mtime))
    if BEHAVIOUR["fail"]:
        raise RuntimeError("the task broke")
    return "slow task done"


@pytest.fixture
def slow(monkeypatch):
    """Task "slow": period one hour, so only a stamp the test ages (os.utime) makes it due again."""
    monkeypatch.setitem(cron.TASKS, "slow", cron.Task("slow", "tests.test_cron:slow_task", 3600.0, "cluster", "test"))
    monkeypatch.setitem(BEHAVIOUR, "fail", False)
    SEEN.clear()
    return "slow"


def age_stamp(settings, name: str, age: float) -> float:
    """Set task *name*'s stamp to *age* seconds old by the shared filesystem's clock; its new mtime."""
    when = heartbeat.fs_now(settings) - age
    os.utime(cron.stamp_path(settings, cron.TASKS[name]), (when, when))
    return when


def keep_alive(settings, node: str) -> None:
    """Date *node*'s heartbeat an hour ahead: alive to any observer however slowly this machine runs."""
    when = heartbeat.fs_now(settings) + 3600
    os.utime(heartbeat.nodes_dir(settings) / node, (when, when))


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
    assert not second["ran"] and re.search(r"started \d+s ago on h1", second["summary"])
    forced = run(nodes["h2"], "expire-held", "--force")
    assert forced["ran"]
    listing = json.loads(nodes["h3"].mailq("cron", "list", "--json", check=True).stdout)
    row = next(r for r in listing if r["task"] == "expire-held")
    assert row["last_node"] == "h2" and row["last_age"] is not None


def test_a_run_one_period_after_the_last_start_runs_however_long_the_last_run_took(nodes, slow):
    s1, s2 = nodes["h1"].settings(), nodes["h2"].settings()
    assert cron.run_task(s1, slow).ran
    # The stamp was written before the task body ran, and the end of the run did not touch it:
    # its mtime is the run's start, however long the run took.
    (record, mtime_seen), = SEEN
    stamp = cron.stamp_path(s1, cron.TASKS[slow])
    assert record["node"] == "h1" and stamp.stat().st_mtime == mtime_seen
    assert not cron.run_task(s2, slow).ran                  # within the period, on another node
    # The next cron tick comes a little short of one period after the last start (cron's jitter):
    # still due, within the tolerance.
    age_stamp(s1, slow, cron.TASKS[slow].period * (1 - cron.TOLERANCE / 2))
    again = cron.run_task(s2, slow)
    assert again.ran and again.ok, again.summary
    last = cron.last_run(s1, cron.TASKS[slow])
    assert last["node"] == "h2" and last["summary"] == "slow task done" and last["ok"]
    # Short of the tolerance it is not due yet.
    age_stamp(s1, slow, cron.TASKS[slow].period * (1 - 2 * cron.TOLERANCE))
    assert not cron.run_task(s1, slow).ran


def test_a_failed_run_keeps_the_previous_stamp_so_the_next_tick_retries(nodes, slow):
    s1, s2 = nodes["h1"].settings(), nodes["h2"].settings()
    assert cron.run_task(s1, slow).ran
    stamp = cron.stamp_path(s1, cron.TASKS[slow])
    h1_started = age_stamp(s1, slow, 60)                  # h1's run started a minute ago
    BEHAVIOUR["fail"] = True
    failed = cron.run_task(s2, slow, force=True)
    assert failed.ran and not failed.ok and "the task broke" in failed.summary
    last = cron.last_run(s1, cron.TASKS[slow])
    assert last["node"] == "h1" and last["summary"] == "slow task done"     # h1's run still the last one
    assert stamp.stat().st_mtime == h1_started                             # with its start time
    BEHAVIOUR["fail"] = False
    assert not cron.run_task(s2, slow).ran                 # the failed run did not reset the period...
    age_stamp(s1, slow, cron.TASKS[slow].period)           # ...and the tick one period after h1's start runs
    assert cron.run_task(s2, slow).ran
    stamp.unlink()
    BEHAVIOUR["fail"] = True
    assert not cron.run_task(s1, slow).ok and not stamp.exists()       # never ran well: due at once
    BEHAVIOUR["fail"] = False
    assert cron.run_task(s1, slow).ran


def test_a_node_task_runs_on_every_node(nodes):
    assert run(nodes["h1"], "recover")["ran"]
    assert run(nodes["h2"], "recover")["ran"]
    assert not run(nodes["h1"], "recover")["ran"]


def test_simultaneous_runs_on_two_nodes_run_the_task_once(nodes):
    procs = [subprocess.Popen([sys.executable, "-m", "mailq.cli.ctl", "cron", "run", "expire-held", "--json"],
                              cwd=ROOT, env=nodes[n].environ(), stdout=subprocess.PIPE) for n in ("h1", "h2", "h3")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    ran = [json.loads(o)["ran"] for p, o in zip(procs, outs, strict=True) if p.returncode == 0]
    assert all(p.returncode in (0, 75) for p in procs)
    assert ran.count(True) == 1


def test_check_failover_from_cron_takes_over_a_silent_node(nodes):
    nodes["h1"].mailq("slices", "init", "--nodes", "h1,h2", check=True)
    settings = nodes["h3"].settings()
    assert heartbeat.Heartbeat(nodes["h1"].settings()).renew()
    keep_alive(settings, "h1")
    path = heartbeat.nodes_dir(settings) / "h2"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    now = heartbeat.fs_now(settings)
    os.utime(path, (now - 60, now - 60))
    result = run(nodes["h3"], "check-failover")
    assert result["ran"] and "fenced h2" in result["summary"]
    smap = load_map(settings.slice_map_path)
    assert smap.nodes["h2"].fenced and smap.slices_for("h1")


def test_check_failover_without_backups_spreads_the_dead_nodes_slices_over_the_live_ones(tmp_path):
    var = tmp_path / "var"
    made = {n: make_node(tmp_path, n, var=var, cluster={"failover": "auto"}, runners={"slices": {"out": 6, "in": 3}})
            for n in ("h1", "h2", "h3")}
    made["h1"].mailq("slices", "init", "--nodes", "h1,h2,h3", "--no-backups", check=True)
    settings = made["h1"].settings()
    before = load_map(settings.slice_map_path)
    assert before.nodes["h3"].backup is None
    taken = before.slices_for("h3")
    for n in ("h1", "h2", "h3"):
        assert heartbeat.Heartbeat(made[n].settings()).renew()
    for n in ("h1", "h2"):
        keep_alive(settings, n)
    path = heartbeat.nodes_dir(settings) / "h3"
    now = heartbeat.fs_now(settings)
    os.utime(path, (now - 60, now - 60))
    result = run(made["h1"], "check-failover")
    assert result["ran"] and "fenced h3" in result["summary"], result
    after = load_map(settings.slice_map_path)
    assert after.nodes["h3"].fenced and after.slices_for("h3") == []
    got = {n: [(q, s) for q, s, _ in taken if after.owner_of(q, s) == n] for n in ("h1", "h2")}
    assert len(got["h1"]) + len(got["h2"]) == len(taken)
    assert abs(len(got["h1"]) - len(got["h2"])) <= 1, got                  # shared evenly
    for queue in ("in", "out"):                                            # and evenly per queue
        owners = after.queues[queue]
        assert abs(owners.count("h1") - owners.count("h2")) <= 1, (queue, owners)


def test_an_unknown_task_is_refused_with_the_known_ones(nodes):
    result = nodes["h1"].mailq("cron", "run", "nope")
    assert result.returncode == 1 and "expire-held" in result.stderr and "check-failover" in result.stderr
