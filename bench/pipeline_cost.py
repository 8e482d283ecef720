"""Benchmark the per-post cost of the list pipeline for a 1,000-member list, today's stages and all on.

    python bench/pipeline_cost.py [--members 1000] [--posts 200] [--no-fsync]

What one post costs the ``in`` runner, measured the way the runner does it, in a fresh temp var
with a real ListStore: load the list without a lock (``ListStore.load``), parse the message
(compat32), run the stages and then ``ctx.flush``, the real enqueues into ``archive`` (one entry
for archive + pending digest) and ``out`` (fsync on by default, as configured out of the box).
The stages are run one by one exactly as ``mailq.pipeline.run`` does, so the result also splits
the cost per stage (``stage_ms_median``, with the flush as ``queue_writes``) and for list load +
parse.  Samples cycle through plain, multipart/alternative, multipart/mixed with an attachment,
signed and encoded-subject messages from tests/data, and a post with three attachments (pdf,
exe, zip) built here.

Two pipelines are measured in the same run on the same posts (issue 16):

* ``today``: the stages before issue 16 (sanity, moderation, subject_prefix, list_headers,
  footer, recipients, avoid_duplicates, to_archive, to_digest, to_outgoing);
* ``all_on``: the default pipeline with every new stage doing real work: ``sender_rules``
  (defaults: administrivia, explicit destination), ``dmarc`` with the posters' domain publishing
  ``p=reject`` (a real DNS responder on loopback; the first post fills the shared cache, every
  measured post is answered from it, and every post gets its From: munged), and ``mime_filter``
  with ``filter_content`` on (the .exe is removed, the HTML alternative collapsed).

Printed: per-stage medians of the new stages (``dmarc_cached_ms``, ``mime_filter_3_attachments_ms``
on the three-attachment post, ``sender_rules_ms``) and their share of the all-on pipeline, and
``all_on_vs_today`` (median wall time ratio; target <= 2).  The last line is one JSON object.
``bench_pipeline(...)`` returns the figures of one pipeline and is what ``bench/flow.py`` imports.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLES = ("plain.eml", "alternative.eml", "mixed_attachment.eml", "signed.eml", "subject_utf8.eml",
           "subject_iso2022jp.eml", "prefixed.eml")
THREE = "three_attachments"
#: The post pipeline before issue 16 added sender_rules, dmarc and mime_filter.
TODAY = ("sanity", "moderation", "subject_prefix", "list_headers", "footer", "recipients",
         "avoid_duplicates", "to_archive", "to_digest", "to_outgoing")
#: Every sample's poster is @example.org (or .jp/.ru): these publish p=reject on the bench's DNS.
ZONE = {(f"_dmarc.{d}", "TXT"): ["v=DMARC1; p=reject"] for d in ("example.org", "example.jp", "example.ru")}


def three_attachments() -> bytes:
    """A member's post with a text body and three attachments: a PDF, a Windows program, a zip."""
    from email.mime.application import MIMEApplication
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    msg = MIMEMultipart("mixed")
    msg["From"] = "Alice Example <alice@example.org>"
    msg["To"] = "dev@example.org"
    msg["Subject"] = "three files"
    msg["Message-ID"] = "<three@example.org>"
    msg.attach(MIMEText("The report, the installer and the sources.\n" * 20, "plain", "utf-8"))
    for data, subtype, name in ((b"%PDF-1.4\n" + b"x" * 20000, "pdf", "report.pdf"),
                                (b"MZ" + b"\0" * 30000, "x-msdownload", "setup.exe"),
                                (b"PK\x03\x04" + b"z" * 15000, "zip", "sources.zip")):
        part = MIMEApplication(data, subtype)
        part.add_header("Content-Disposition", "attachment", filename=name)
        msg.attach(part)
    return msg.as_bytes()


def bench_pipeline(members: int = 1000, posts: int = 200, fsync: bool = True, *,
                   stages: tuple[str, ...] | None = None, filter_content: bool = False,
                   in_batch: int | None = None) -> dict:
    """Per-post pipeline cost in ms for a list of *members*; keys ``pipeline_ms_median`` etc.

    *stages*: the pipeline to run (default: the configured default).  *filter_content*: the
    list filters content (mime_filter does real work).  DNS goes to a loopback responder.
    *in_batch*: posts numbered per lock cycle, as the in runner does under a backlog (default
    ``pipeline.in_batch``; 1: posts that arrive one at a time).
    """
    from mailq.config import Settings
    from mailq.lists import ListStore, Member
    from mailq.lists.numbers import take_many
    from mailq.loopdns import LoopDNS
    from mailq.pipeline import Context, load_stage
    from mailq.pipeline.base import parse
    from mailq.pipeline.post_number import NUMBER_STAGE
    from mailq.queue import Queue

    tmp = Path(tempfile.mkdtemp(prefix="mailq-bench-pipeline-"))
    dns = LoopDNS(ZONE, ttl=3600, negative_ttl=3600).__enter__()
    try:
        settings = Settings()
        settings.paths.var = tmp / "var"
        settings.node.name = f"bench-{tmp.name[-8:]}"  # a fresh logger per call (its folder is ours)
        settings.queue.fsync = fsync
        settings.dns.nameservers, settings.dns.port = ["127.0.0.1"], dns.port
        in_batch = max(1, in_batch or settings.pipeline.in_batch)
        store = ListStore(settings)
        store.create("bench", "owner@example.org", "example.org", subject_prefix="[bench] ",
                     footer="Leave: {leave_address}", max_message_kb=0, max_recipients=0,
                     filter_content=filter_content, require_explicit_destination=False)
        with store.edit("bench") as mlist:
            mlist.members.add_many(Member(f"member{i:05d}@example.net", digest=(i % 50 == 0))
                                   for i in range(members))
            mlist.members.add_many([Member(a) for a in ("alice@example.org", "bob@example.org",
                                                          "carol@example.org", "dave@example.org",
                                                          "juergen@example.org", "taro@example.jp")])
        raws = [(name, (ROOT / "tests" / "data" / name).read_bytes()) for name in SAMPLES]
        raws.append((THREE, three_attachments()))
        queues = {q: Queue.for_settings(settings, q) for q in ("out", "archive")}
        log = logging.getLogger("bench.pipeline")
        log.addHandler(logging.NullHandler())
        log.propagate = False

        def enqueue(queue: str, data: bytes, meta: dict) -> str:
            return queues[queue].enqueue(data, meta, listname=meta.get("listname", ""))

        names = list(stages or settings.pipeline.posts)
        modules = [load_stage(n) for n in names]
        # The in runner's way (mailq/runners/incoming.py): a batch of posts runs the stages before
        # post_number, the batch takes its numbers in one lock cycle (take_many), then each post runs
        # post_number and the rest and is written.  That cycle's time is shared by the batch's posts.
        split = names.index(NUMBER_STAGE) if NUMBER_STAGE in names else len(names)
        times: list[float] = []
        cpu_times: list[float] = []  # CPU only: steadier than wall time on a loaded machine
        load_parse: list[float] = []
        per_stage: dict[str, list[float]] = {n: [] for n in [*names, "queue_writes"]}
        per_sample: dict[str, dict[str, list[float]]] = {}
        recipients = 0
        warm = len(raws)   # every sample once: imports, caches, the DMARC answers into the shared cache
        batches = [list(range(warm))] + [list(range(start, min(start + in_batch, warm + posts)))
                                         for start in range(warm, warm + posts, in_batch)]
        for batch in batches:
            going = []
            for i in batch:
                sample, raw = raws[i % len(raws)]
                started = time.perf_counter()
                cpu_started = time.process_time()
                ml = store.load("bench")
                msg = parse(raw)
                metadata = {"listname": "bench", "kind": "post", "size": len(raw), "received": time.time()}
                prepared = time.perf_counter()
                ctx = Context(settings, log, enqueue, origin=hashlib.sha1(f"{tmp}/{i}".encode()).hexdigest())
                # What mailq.pipeline.run does, one stage at a time, so the cost can be split per stage.
                stage_times = []
                for name, stage in zip(names[:split], modules[:split], strict=True):
                    t0 = time.perf_counter()
                    ctx.trail.append(name)
                    stage.process(ml, msg, metadata, ctx)
                    stage_times.append((time.perf_counter() - t0) * 1000.0)
                going.append((i, sample, ml, msg, metadata, ctx, stage_times, prepared - started,
                              time.perf_counter() - started, time.process_time() - cpu_started))
            shared = shared_cpu = 0.0
            if split < len(names):
                t0, c0 = time.perf_counter(), time.process_time()
                numbers = take_many(settings, "bench", [g[5].origin for g in going])
                shared = (time.perf_counter() - t0) / len(going)
                shared_cpu = (time.process_time() - c0) / len(going)
                for g, number in zip(going, numbers, strict=True):
                    g[4]["post_number"] = number
            for i, sample, ml, msg, metadata, ctx, stage_times, prep, elapsed, cpu in going:
                started = time.perf_counter()
                cpu_started = time.process_time()
                for name, stage in zip(names[split:], modules[split:], strict=True):
                    t0 = time.perf_counter()
                    ctx.trail.append(name)
                    stage.process(ml, msg, metadata, ctx)
                    ms = (time.perf_counter() - t0) * 1000.0
                    stage_times.append(ms + shared * 1000.0 if name == NUMBER_STAGE else ms)
                t0 = time.perf_counter()
                ctx.flush()  # the archive entry (archive + digest copy), then out, as run() does at the end
                stage_times.append((time.perf_counter() - t0) * 1000.0)
                elapsed += time.perf_counter() - started + shared
                cpu += time.process_time() - cpu_started + shared_cpu
                if i >= warm:
                    times.append(elapsed * 1000.0)
                    cpu_times.append(cpu * 1000.0)
                    load_parse.append(prep * 1000.0)
                    for name, ms in zip([*names, "queue_writes"], stage_times, strict=True):
                        per_stage[name].append(ms)
                        per_sample.setdefault(sample, {}).setdefault(name, []).append(ms)
                    recipients = len(metadata["recipients"])
        times.sort()
        return {
            "pipeline_ms_median": round(statistics.median(times), 3),
            "pipeline_ms_p90": round(times[int(len(times) * 0.9) - 1], 3),
            "pipeline_ms_min": round(times[0], 3),
            "pipeline_cpu_ms_median": round(statistics.median(cpu_times), 3),
            "members": members + 6,
            "recipients_per_post": recipients,
            "posts": posts,
            "in_batch": in_batch,
            "fsync": fsync,
            "stages": names,
            "dns_queries": len(dns.queries),
            "load_parse_ms_median": round(statistics.median(load_parse), 3),
            "stage_ms_median": {n: round(statistics.median(v), 3) for n, v in per_stage.items()},
            "three_attachments_stage_ms_median": {
                n: round(statistics.median(v), 3) for n, v in per_sample.get(THREE, {}).items()},
        }
    finally:
        dns.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


def compare(members: int, posts: int, fsync: bool, in_batch: int | None = None) -> dict:
    """Today's pipeline and the all-on one, in one run, on the same posts; the issue 16 figures.

    The all-on pipeline is measured twice: with the in runner's batch (a backlog: ``in_batch``
    posts share one post-number lock cycle) and one post at a time (``..._one_at_a_time``).
    """
    today = bench_pipeline(members, posts, fsync, stages=TODAY, in_batch=in_batch)
    all_on = bench_pipeline(members, posts, fsync, filter_content=True, in_batch=in_batch)
    single = bench_pipeline(members, posts, fsync, filter_content=True, in_batch=1)
    whole = all_on["pipeline_ms_median"]
    stage = all_on["stage_ms_median"]
    three = all_on["three_attachments_stage_ms_median"]
    new = {"dmarc_cached_ms": stage["dmarc"], "mime_filter_3_attachments_ms": three["mime_filter"],
           "sender_rules_ms": stage["sender_rules"], "mime_filter_ms": stage["mime_filter"]}
    return {
        "today_ms_median": today["pipeline_ms_median"],
        "all_on_ms_median": whole,
        "today_cpu_ms_median": today["pipeline_cpu_ms_median"],
        "all_on_cpu_ms_median": all_on["pipeline_cpu_ms_median"],
        "all_on_vs_today": round(whole / today["pipeline_ms_median"], 3),
        "all_on_vs_today_cpu": round(all_on["pipeline_cpu_ms_median"] / today["pipeline_cpu_ms_median"], 3),
        "in_batch": all_on["in_batch"],
        "post_number_ms": stage["post_number"],
        "post_number_ms_one_at_a_time": single["stage_ms_median"]["post_number"],
        "all_on_ms_median_one_at_a_time": single["pipeline_ms_median"],
        "all_on_vs_today_one_at_a_time": round(single["pipeline_ms_median"] / today["pipeline_ms_median"], 3),
        **new,
        "share_of_all_on": {k: round(v / whole, 4) for k, v in new.items()},
        "dmarc_dns_queries": all_on["dns_queries"],
        "members": all_on["members"],
        "posts": posts,
        "fsync": fsync,
        "today": today,
        "all_on": all_on,
        "all_on_one_at_a_time": single,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--no-fsync", action="store_true", help="queue writes without fsync (CPU cost only)")
    parser.add_argument("--in-batch", type=int, default=None,
                        help="posts numbered per lock cycle (default: pipeline.in_batch, the in runner's batch)")
    args = parser.parse_args()
    r = compare(args.members, args.posts, fsync=not args.no_fsync, in_batch=args.in_batch)
    err = sys.stderr
    print(f"pipeline per post ({r['members']} members, {r['posts']} posts, fsync {'on' if r['fsync'] else 'off'}):",
          file=err)
    print(f"  today  (10 stages): median {r['today_ms_median']} ms wall, {r['today_cpu_ms_median']} ms CPU", file=err)
    print(f"  all on (13 stages): median {r['all_on_ms_median']} ms wall, {r['all_on_cpu_ms_median']} ms CPU",
          file=err)
    print(f"  all_on_vs_today: {r['all_on_vs_today']} wall, {r['all_on_vs_today_cpu']} CPU (target <= 2)", file=err)
    print(f"  post_number: {r['post_number_ms']} ms with batches of {r['in_batch']}, "
          f"{r['post_number_ms_one_at_a_time']} ms one post at a time (all on: "
          f"{r['all_on_vs_today_one_at_a_time']} x today)", file=err)
    for key in ("dmarc_cached_ms", "mime_filter_3_attachments_ms", "sender_rules_ms"):
        print(f"  {key}: {r[key]} ms = {r['share_of_all_on'][key] * 100:.1f}% of the all-on pipeline", file=err)
    print(f"  DNS queries in the all-on run: {r['dmarc_dns_queries']} (then every answer came from the cache)",
          file=err)
    print(json.dumps(r, sort_keys=True))


if __name__ == "__main__":
    main()
