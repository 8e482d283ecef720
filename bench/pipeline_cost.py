"""Benchmark the per-post cost of the list pipeline for a 1,000-member list.

    python bench/pipeline_cost.py [--members 1000] [--posts 200] [--no-fsync]

What one post costs the ``in`` runner, measured the way the runner does it, in a fresh temp var
with a real ListStore: load the list without a lock (``ListStore.load``), parse the message
(compat32), run ``settings.pipeline.posts`` (sanity ... to_outgoing) and then ``ctx.flush``, the
real enqueues into ``archive`` (one entry for archive + pending digest) and ``out`` (fsync on by
default, as configured out of the box).  The stages are run one by one exactly as
``mailq.pipeline.run`` does, so the result also splits the cost per stage (``stage_ms_median``,
with the flush as ``queue_writes``) and for list load + parse.  Samples cycle
through plain, multipart/alternative, multipart/mixed with an attachment, signed and
encoded-subject messages from tests/data.

``bench_pipeline(...)`` returns a dict and is what ``bench/flow.py`` imports; run alone, the last
line printed is that dict as JSON.
"""
from __future__ import annotations

import argparse
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


def bench_pipeline(members: int = 1000, posts: int = 200, fsync: bool = True) -> dict:
    """Per-post pipeline cost in ms for a list of *members*; keys ``pipeline_ms_median`` etc."""
    from mailq.config import Settings
    from mailq.lists import ListStore, Member
    from mailq.pipeline import Context, load_stage
    from mailq.pipeline.base import parse
    from mailq.queue import Queue

    tmp = Path(tempfile.mkdtemp(prefix="mailq-bench-pipeline-"))
    try:
        settings = Settings()
        settings.paths.var = tmp / "var"
        settings.node.name = f"bench-{tmp.name[-8:]}"  # a fresh logger per call (its folder is ours)
        settings.queue.fsync = fsync
        store = ListStore(settings)
        store.create("bench", "owner@example.org", "example.org", subject_prefix="[bench] ",
                     footer="Leave: {leave_address}", max_message_kb=0, max_recipients=0)
        with store.edit("bench") as mlist:
            mlist.members.add_many(Member(f"member{i:05d}@example.net", digest=(i % 50 == 0))
                                   for i in range(members))
            mlist.members.add_many([Member(a) for a in ("alice@example.org", "bob@example.org",
                                                          "carol@example.org", "dave@example.org",
                                                          "juergen@example.org", "taro@example.jp")])
        raws = [(ROOT / "tests" / "data" / name).read_bytes() for name in SAMPLES]
        queues = {q: Queue.for_settings(settings, q) for q in ("out", "archive")}
        log = logging.getLogger("bench.pipeline")
        log.addHandler(logging.NullHandler())
        log.propagate = False

        def enqueue(queue: str, data: bytes, meta: dict) -> str:
            return queues[queue].enqueue(data, meta, listname=meta.get("listname", ""))

        names = list(settings.pipeline.posts)
        stages = [load_stage(n) for n in names]
        times: list[float] = []
        cpu_times: list[float] = []  # CPU only: steadier than wall time on a loaded machine
        load_parse: list[float] = []
        per_stage: dict[str, list[float]] = {n: [] for n in [*names, "queue_writes"]}
        recipients = 0
        for i in range(posts + 5):
            raw = raws[i % len(raws)]
            started = time.perf_counter()
            cpu_started = time.process_time()
            ml = store.load("bench")
            msg = parse(raw)
            metadata = {"listname": "bench", "kind": "post", "size": len(raw), "received": time.time()}
            prepared = time.perf_counter()
            ctx = Context(settings, log, enqueue)
            # What mailq.pipeline.run does, one stage at a time, so the cost can be split per stage.
            stage_times = []
            for name, stage in zip(names, stages, strict=True):
                t0 = time.perf_counter()
                ctx.trail.append(name)
                stage.process(ml, msg, metadata, ctx)
                stage_times.append((time.perf_counter() - t0) * 1000.0)
            t0 = time.perf_counter()
            ctx.flush()  # the archive entry (archive + digest copy), then out, as run() does at the end
            stage_times.append((time.perf_counter() - t0) * 1000.0)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            if i >= 5:  # the first posts warm imports and caches
                times.append(elapsed * 1000.0)
                cpu_times.append(cpu * 1000.0)
                load_parse.append((prepared - started) * 1000.0)
                for name, ms in zip([*names, "queue_writes"], stage_times, strict=True):
                    per_stage[name].append(ms)
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
            "fsync": fsync,
            "load_parse_ms_median": round(statistics.median(load_parse), 3),
            "stage_ms_median": {n: round(statistics.median(v), 3) for n, v in per_stage.items()},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--no-fsync", action="store_true", help="queue writes without fsync (CPU cost only)")
    args = parser.parse_args()
    result = bench_pipeline(args.members, args.posts, fsync=not args.no_fsync)
    print(f"pipeline per post ({result['members']} members, {result['recipients_per_post']} regular "
          f"recipients, fsync {'on' if result['fsync'] else 'off'}): median {result['pipeline_ms_median']} ms, "
          f"p90 {result['pipeline_ms_p90']} ms, CPU median {result['pipeline_cpu_ms_median']} ms", file=sys.stderr)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
