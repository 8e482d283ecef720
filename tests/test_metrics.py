"""``mailqctl metrics``, the master's ``/metrics`` and the alert rules (docs/operations.md "Metrics").

The exposition is parsed back with prometheus_client's own parser; the alert rules are checked and
unit-tested with ``promtool`` (Debian's prometheus package, installed by tests/setup-system.sh where
the suite runs as root: there these tests must run; elsewhere they skip with the reason).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_support import MEMBERS, Cluster, deliveries
from tests.support import ROOT, free_port, make_node, skip_unless_ready, wait_for

ALERTS = ROOT / "etc" / "prometheus" / "mailq-alerts.yml"


def samples(text: str) -> dict[str, list]:
    """Series name -> [(labels, value)] of an exposition."""
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(got: dict, name: str, **labels: str) -> float:
    found = [v for lab, v in got.get(name, []) if all(lab.get(k) == want for k, want in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {sorted(got)}"
    return found[0]


def test_a_running_node_reports_its_queues_runners_and_deliveries(tmp_path, sink):
    port = free_port()
    c = Cluster(tmp_path, sink, names=("h1",), slices={"in": 2, "out": 2},
                overrides={"metrics": {"port": port}})
    try:
        c.setup()
        c.start()
        h1 = c.hosts["h1"].node
        wait_for(lambda: "master running" in c.hosts["h1"].log_text("master"), 60, message="master running")
        tags = c.post(10)
        wait_for(lambda: all(deliveries(sink)[(t, m)] for t in tags for m in MEMBERS), 120,
                 message="every post delivered")

        def counted() -> dict:
            text = h1.run("mailqctl", "metrics", check=True).stdout
            assert "# TYPE mailq_bounces_scored_total counter" in text    # declared before any bounce
            got = samples(text)
            done = sum(v for lab, v in got.get("mailq_smtp_recipients_total", []) if lab["result"] == "delivered")
            processed = sum(v for lab, v in got.get("mailq_entries_processed_total", [])
                            if lab["runner"].startswith("in:"))
            return got if (done, processed) == (len(tags) * len(MEMBERS), len(tags)) else {}

        # Runners write their counters at most once a second: wait for the in and out runners' files.
        got = wait_for(counted, 60, interval=0.2, message="the in and out runners' counters flushed")
        epoch = c.settings().slice_map_path.read_text()
        assert f"epoch: {int(value(got, 'mailq_slice_map_epoch'))}" in epoch
        assert value(got, "mailq_slice_map_problem") == 0
        assert value(got, "mailq_node_alive", node="h1") == 1
        assert value(got, "mailq_node_heartbeat_age_seconds", node="h1") < 10
        assert value(got, "mailq_self_fenced", node="h1") == 0 and value(got, "mailq_master_up", node="h1") == 1
        for queue, count in (("in", 2), ("out", 2), ("virgin", 1)):
            for s in range(count):
                key = {"queue": queue, "slice": str(s), "count": str(count)}
                assert value(got, "mailq_queue_waiting", **key) == 0
                assert value(got, "mailq_slice_owner_alive", owner="h1", **key) == 1
        assert value(got, "mailq_runner_running", node="h1", runner="out:1/2") == 1
        assert value(got, "mailq_runner_restarts", node="h1", runner="out:1/2") == 0
        assert value(got, "mailq_holding_entries", queue="shunt") == 0
        # The master serves the same series on its loopback port.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            served = samples(response.read().decode())
        assert value(served, "mailq_node_alive", node="h1") == 1
        assert value(served, "mailq_runner_running", node="h1", runner="in:0/2") == 1
    finally:
        c.stop()
    stopped = samples(h1.run("mailqctl", "metrics", "--no-queues", check=True).stdout)
    assert value(stopped, "mailq_master_up", node="h1") == 0
    assert "mailq_queue_waiting" not in stopped
    # With a map and nobody renewing the lease, the node counts as self-fenced once the lease runs out.
    wait_for(lambda: value(samples(h1.run("mailqctl", "metrics", "--no-queues").stdout), "mailq_self_fenced",
                           node="h1") == 1, 60, interval=0.5, message="the lease run out")


def test_queue_ages_claims_and_holding_queues_without_runners(tmp_path):
    from mailq.queue import Claimant, Queue

    node = make_node(tmp_path, "n1")
    settings = node.settings()
    q = Queue.for_settings(settings, "out")
    old = q.enqueue(b"Subject: old\r\n\r\nx\r\n", {"listname": "dev"})
    new = q.enqueue(b"Subject: new\r\n\r\nx\r\n", {"listname": "dev"})
    path = next(settings.queue_dir("out").rglob(f"{old}.pck"))
    os.utime(path, (time.time() - 3600, time.time() - 3600))         # written an hour ago
    claimed = q.claim(new, Claimant("n1", 999999, 0))
    shunt = Queue.for_settings(settings, "in")
    entry = shunt.claim(shunt.enqueue(b"Subject: s\r\n\r\nx\r\n", {"listname": "dev"}), Claimant("n1", 999999, 0))
    shunt.shunt(entry, "boom")
    got = samples(node.run("mailqctl", "metrics", check=True).stdout)
    key = {"queue": "out", "slice": "0", "count": "1"}
    assert claimed is not None and value(got, "mailq_queue_claimed", **key) == 1
    assert value(got, "mailq_queue_waiting", **key) == 1
    assert 3500 < value(got, "mailq_queue_oldest_waiting_seconds", **key) < 3700
    assert 0 <= value(got, "mailq_queue_oldest_claim_seconds", queue="out") < 600   # claimed just now
    assert value(got, "mailq_holding_entries", queue="shunt") == 1
    assert value(got, "mailq_holding_entries", queue="bad") == 0
    assert value(got, "mailq_self_fenced", node="n1") == 0           # no map: a single host never fences
    assert "mailq_slice_map_epoch" not in got


def test_textfile_is_written_whole_for_node_exporter(tmp_path):
    node = make_node(tmp_path, "n1")
    folder = tmp_path / "textfile"
    folder.mkdir()
    result = node.run("mailqctl", "metrics", "--textfile", str(folder), check=True)
    assert result.stdout == "" and "mailq_n1.prom" in result.stderr
    assert [p.name for p in folder.iterdir()] == ["mailq_n1.prom"]   # no temp file left behind
    got = samples((folder / "mailq_n1.prom").read_text())
    assert value(got, "mailq_holding_entries", queue="bad") == 0
    bad = node.run("mailqctl", "metrics", "--textfile", str(tmp_path / "missing"))
    assert bad.returncode != 0


def test_lock_waits_and_counters_reach_the_exposition(tmp_path):
    from mailq import stats
    from mailq.locks import named_lock
    from mailq.metrics import exposition

    settings = make_node(tmp_path, "n1").settings()
    stats.start(settings, "test:0/1")
    for _ in range(3):
        with named_lock(settings, "metrics-test"):
            pass
    stats.count("mailq_bounces_scored_total", 2)
    stats.flush(force=True)
    got = samples(exposition(settings, queues=False).decode())
    assert value(got, "mailq_lock_wait_seconds_count", node="n1") == 3
    assert value(got, "mailq_lock_wait_seconds_bucket", node="n1", le="+Inf") == 3
    assert value(got, "mailq_bounces_scored_total", node="n1") == 2


def _promtool() -> str:
    reason = "" if shutil.which("promtool") else "promtool is not installed (Debian package prometheus)"
    skip_unless_ready(reason, ("prometheus",))
    return shutil.which("promtool") or "promtool"


def test_alert_rules_pass_promtool_check():
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


RULE_TESTS = """\
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mailq_node_heartbeat_age_seconds{{node="h1",instance="a"}}'
        values: '1 200+60x10'
      - series: 'mailq_node_heartbeat_age_seconds{{node="h2",instance="a"}}'
        values: '1+0x10'
      - series: 'mailq_node_fenced{{node="h1",instance="a"}}'
        values: '0+0x10'
      - series: 'mailq_node_fenced{{node="h2",instance="a"}}'
        values: '0+0x10'
      - series: 'mailq_cluster_takeover_after_seconds{{instance="a"}}'
        values: '12+0x10'
      - series: 'mailq_slice_owner_alive{{queue="out",slice="1",count="3",owner="h1",instance="a"}}'
        values: '1 0+0x10'
      - series: 'mailq_queue_oldest_waiting_seconds{{queue="out",slice="1",count="3",instance="a"}}'
        values: '0 1000+60x10'
      - series: 'mailq_holding_entries{{queue="shunt",instance="a"}}'
        values: '0+1x60'
    alert_rule_test:
      - eval_time: 5m
        alertname: MailqNodeSilent
        exp_alerts:
          - exp_labels: {{severity: critical, node: h1}}
            exp_annotations:
              summary: "mailq node h1 is silent (heartbeat 7m 20s old)"
              description: "Its heartbeat is older than lease + margin and it is not fenced: nobody has
                taken its slices yet. See mailqctl cluster status."
      - eval_time: 5m
        alertname: MailqSliceWithoutLiveOwner
        exp_alerts:
          - exp_labels: {{severity: critical, queue: out, slice: "1", count: "3", owner: h1}}
            exp_annotations:
              summary: "mailq slice out:1/3 has no live owner (h1)"
              description: "Mail in this slice is not processed. Take the owner over
                (mailqctl slices reassign --from h1) or start its master."
      - eval_time: 8m
        alertname: MailqOldestEntryTooOld
        exp_alerts:
          - exp_labels: {{severity: warning, queue: out, slice: "1", count: "3"}}
            exp_annotations:
              summary: "mailq queue out slice 1/3: oldest due entry 23m 40s old"
              description: "Look at mailqctl cluster status and the runner's log (var/log/NODE/out.log)."
      - eval_time: 2m
        alertname: MailqOldestEntryTooOld
        exp_alerts: []
      - eval_time: 59m
        alertname: MailqShuntGrowing
        exp_alerts:
          - exp_labels: {{severity: warning, queue: shunt}}
            exp_annotations:
              summary: "mailq shunt queue grew by 30 entries in 30 minutes"
              description: "Processing keeps failing. Inspect with mailqctl queue show shunt; fix,
                then mailqctl queue unshunt."
"""


def test_alert_rules_fire_on_what_they_are_for(tmp_path):
    """promtool test rules: a silent node, an ownerless slice, an old entry and a growing shunt alert;
    a live node and a fresh queue do not."""
    tests = tmp_path / "mailq-alerts-test.yml"
    tests.write_text(textwrap.dedent(RULE_TESTS).format(rules=ALERTS))
    result = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
