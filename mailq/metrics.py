"""Prometheus metrics for this node and the shared tree (``mailqctl metrics``, the master's ``/metrics``).

Everything is read at collection time, with the official ``prometheus_client`` library doing the
exposition: the shared tree (slice map, heartbeats, queue folders: the same reads as ``mailqctl
cluster status``), this node's master status (runner restarts) and lease, and the counters its
runners and master keep in ``<run_dir>/stats/`` (:mod:`mailq.stats`).  Ages are measured by the
shared filesystem's clock (a probe file's mtime), like every age in the cluster (docs/cluster.md §2).
Every series and its meaning: docs/operations.md "Metrics".
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mailq import stats
from mailq.cluster.heartbeat import fs_now, lease_age, read_all, state_of
from mailq.cluster.slicemap import map_in_force
from mailq.cluster.status import slice_rows
from mailq.config import RUNNER_QUEUES, Settings
from mailq.queue import Queue
from mailq.runstate import read_status, running_pid

#: Holding queues counted as a whole (entries an operator must look at).
HOLDING = ("shunt", "bad")
#: Counters the runners keep (mailq.stats), exported with a ``node`` label (and the runner's).
COUNTERS = {
    "mailq_entries_processed_total": ("Queue entries a runner finished", "runner", None),
    "mailq_entries_failed_total": ("Queue entries a runner could not finish, by what became of them "
                                   "(shunted: processing error; requeued: temporary failure)", "runner", "how"),
    "mailq_smtp_recipients_total": ("Recipients handed to SMTP by the out runners, by result (delivered; "
                                    "deferred: to retry; failed: permanent, counted as a bounce; given_up)",
                                    None, "result"),
    "mailq_bounces_scored_total": ("Bounces scored against members by the bounces runner", None, None),
}


class MailqCollector(Collector):
    """Collects every mailq series when Prometheus (or ``mailqctl metrics``) asks."""

    def __init__(self, settings: Settings, *, queues: bool = True) -> None:
        self.settings = settings
        self.queues = queues

    def collect(self) -> Iterator[Any]:

        settings, node = self.settings, self.settings.node.name
        now = fs_now(settings)
        state = map_in_force(settings)
        smap = state.smap

        epoch = GaugeMetricFamily("mailq_slice_map_epoch", "Epoch of the slice map in force (absent: no map)")
        problem = GaugeMetricFamily("mailq_slice_map_problem", "1 while slices.yaml is refused (hand edit invalid, "
                                    "epoch not raised, or missing); mailqctl slices check says why")
        if smap is not None:
            epoch.add_metric([], smap.epoch)
        problem.add_metric([], 1 if state.problem else 0)
        yield epoch
        yield problem

        beats = read_all(settings)
        names = sorted(set(beats) | set(smap.nodes if smap else ()))
        age = GaugeMetricFamily("mailq_node_heartbeat_age_seconds", "Age of each node's heartbeat by the shared "
                                "filesystem's clock", labels=["node"])
        alive = GaugeMetricFamily("mailq_node_alive", "1 when the node's heartbeat is alive or late (not past "
                                  "lease + margin) and the node is not fenced", labels=["node"])
        fenced = GaugeMetricFamily("mailq_node_fenced", "1 when the slice map fences the node", labels=["node"])
        states = {}
        for name in names:
            entry = smap.nodes.get(name) if smap else None
            info = beats.get(name)
            states[name] = state_of(settings, info, bool(entry and entry.fenced))
            if info is not None:
                age.add_metric([name], round(info.age, 3))
            alive.add_metric([name], 1 if states[name] in ("alive", "late") else 0)
            fenced.add_metric([name], 1 if entry is not None and entry.fenced else 0)
        yield age
        yield alive
        yield fenced
        limit = GaugeMetricFamily("mailq_cluster_takeover_after_seconds", "lease + margin: a node silent this "
                                  "long is taken over")
        limit.add_metric([], settings.cluster.lease + settings.cluster.margin)
        yield limit

        lease = lease_age(settings)
        own = GaugeMetricFamily("mailq_self_fenced", "1 when this node's runners claim nothing because its master "
                                "could not renew the heartbeat within the lease (or is not running)", labels=["node"])
        own.add_metric([node], 1 if smap is not None and (lease is None or lease > settings.cluster.lease) else 0)
        yield own
        if lease is not None:
            lease_g = GaugeMetricFamily("mailq_lease_age_seconds", "Seconds since this node's last successful "
                                        "heartbeat renewal began (host-local monotonic clock)", labels=["node"])
            lease_g.add_metric([node], round(lease, 3))
            yield lease_g

        if self.queues:
            yield from self._queues(smap, now, states)
        yield from self._runners()
        yield from self._counters()

    def _queues(self, smap: Any, now: float, states: dict[str, str]) -> Iterator[Any]:

        labels = ["queue", "slice", "count"]
        waiting = GaugeMetricFamily("mailq_queue_waiting", "Entries due now in a queue slice", labels=labels)
        deferred = GaugeMetricFamily("mailq_queue_deferred", "Entries waiting for a later due time (retries)",
                                     labels=labels)
        claimed = GaugeMetricFamily("mailq_queue_claimed", "Entries claimed (being processed) in a queue slice",
                                    labels=labels)
        oldest = GaugeMetricFamily("mailq_queue_oldest_waiting_seconds", "Age of the oldest due entry's file in a "
                                   "queue slice (0 when none is due)", labels=labels)
        owner_alive = GaugeMetricFamily("mailq_slice_owner_alive", "1 when the slice's owner in the map in force "
                                        "is alive (or late) and unfenced; 0: nobody runs the slice",
                                        labels=["queue", "slice", "count", "owner"])
        for row in slice_rows(self.settings, smap, now):
            key = [row["queue"], str(row["slice"]), str(row["count"])]
            waiting.add_metric(key, row["waiting"])
            deferred.add_metric(key, row["deferred"])
            claimed.add_metric(key, row["claimed"])
            oldest.add_metric(key, row["oldest_waiting_s"] or 0)
            if smap is not None:
                owner = row["owner"]
                owner_alive.add_metric([*key, owner], 1 if states.get(owner) in ("alive", "late") else 0)
        yield waiting
        yield deferred
        yield claimed
        yield oldest
        if smap is not None:
            yield owner_alive
        claim_age = GaugeMetricFamily("mailq_queue_oldest_claim_seconds", "Age of the oldest claim in a queue (since "
                                      "the claim rename, by the file's ctime; 0 when none)", labels=["queue"])
        for queue in RUNNER_QUEUES:
            ages = []
            for claim in Queue.for_settings(self.settings, queue).claims():
                try:
                    ages.append(now - os.stat(claim.path).st_ctime)
                except OSError:
                    continue        # finished meanwhile
            claim_age.add_metric([queue], round(max(0.0, max(ages)), 3) if ages else 0)
        yield claim_age
        held = GaugeMetricFamily("mailq_holding_entries", "Entries in the holding queues an operator must look at "
                                 "(shunt: processing failed; bad: unreadable)", labels=["queue"])
        for queue in HOLDING:
            held.add_metric([queue], Queue.for_settings(self.settings, queue).counts(1)["waiting"])
        yield held

    def _runners(self) -> Iterator[Any]:
        node = self.settings.node.name
        status = read_status(self.settings)
        up = GaugeMetricFamily("mailq_master_up", "1 while this node's master is running (its status file is "
                               "there and its pid alive)", labels=["node"])
        up.add_metric([node], 1 if status is not None and running_pid(self.settings) else 0)
        yield up
        restarts = GaugeMetricFamily("mailq_runner_restarts", "Restarts of a runner since it last ran stably "
                                     "(the master gives up at runners.restart_cap)", labels=["node", "runner"])
        running = GaugeMetricFamily("mailq_runner_running", "1 while the runner process runs",
                                    labels=["node", "runner"])
        for r in (status or {}).get("runners", []):
            label = r["name"] if r.get("unsliced") else f"{r['name']}:{r['slice']}/{r['count']}"
            restarts.add_metric([node, label], r.get("restarts") or 0)
            running.add_metric([node, label], 1 if r.get("state") == "running" else 0)
        yield restarts
        yield running

    def _counters(self) -> Iterator[Any]:
        node = self.settings.node.name
        files = stats.read_all(self.settings)
        for metric, (text, per_runner, label) in COUNTERS.items():
            labels = ["node"] + (["runner"] if per_runner else []) + ([label] if label else [])
            family = CounterMetricFamily(metric.removesuffix("_total"), text, labels=labels)
            sums: dict[tuple[str, ...], float] = {}
            for data in files:
                for value_label, value in data.get("counters", {}).get(metric, {}).items():
                    key = (node,) + ((data["name"],) if per_runner else ()) + ((value_label,) if label else ())
                    sums[key] = sums.get(key, 0.0) + value
            for key, value in sorted(sums.items()):
                family.add_metric(list(key), value)
            yield family
        bounds = list(stats.LOCK_WAIT_BUCKETS)
        buckets, total, n = [0] * len(bounds), 0.0, 0
        for data in files:
            h = data.get("histograms", {}).get("mailq_lock_wait_seconds")
            if h and h.get("bounds") == bounds:
                buckets = [a + b for a, b in zip(buckets, h["buckets"], strict=True)]
                total += h["sum"]
                n += h["count"]
        cumulative, running_sum = [], 0
        for bound, c in zip(bounds, buckets, strict=True):
            running_sum += c
            cumulative.append((repr(bound), running_sum))
        cumulative.append(("+Inf", n))
        hist = HistogramMetricFamily("mailq_lock_wait_seconds", "Time runners and the master waited to acquire a "
                                     "shared lock (list databases, slice map, held posts, cron tasks)", labels=["node"])
        hist.add_metric([node], cumulative, total)
        yield hist


def registry(settings: Settings, *, queues: bool = True) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(MailqCollector(settings, queues=queues))
    return reg


def exposition(settings: Settings, *, queues: bool = True) -> bytes:
    """The Prometheus text format of every series, as scraped."""
    return generate_latest(registry(settings, queues=queues))


def write_textfile(settings: Settings, folder: Path, *, queues: bool = True) -> Path:
    """Write ``<folder>/mailq_<node>.prom`` atomically (temp + rename) for node_exporter's textfile collector."""
    path = Path(folder) / f"mailq_{settings.node.name}.prom"
    write_to_textfile(str(path), registry(settings, queues=queues))
    return path


def serve(settings: Settings, host: str, port: int) -> Any:
    """Serve ``/metrics`` on *host*:*port* from a daemon thread; returns the server (``shutdown()`` stops it)."""
    server, _thread = start_http_server(port, addr=host, registry=registry(settings))
    return server



