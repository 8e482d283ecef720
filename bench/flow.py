"""Benchmark the mail flow on one host: post -> delivered latency, delivery rate, pipe start-up.

    python bench/flow.py [--posts 100] [--big-posts 30] [--recipients 500] [--rounds 3] [--runs 40]
                         [--pipeline-posts 200] [--keep] [--deliver-only]

``--deliver-only`` runs measurement 1 alone (a change to mailq-deliver's start-up is checked in a minute).

Three measurements, in a fresh temp tree with its own node config:

1. ``deliver_vs_python``: wall time of ``bin/mailq-deliver post LIST < msg`` run as the MTA runs it
   (the program itself, its sh launcher starting .venv's Python with -S; a real enqueue, fsync on)
   against ``python -c pass`` (.venv's Python, site enabled), interleaved, median of --runs each.
   Measured with byte-code caching on (``PYTHONPYCACHEPREFIX`` in the temp tree), as an installed
   mailq runs; the table also shows the figure without cached byte-code (this sandbox sets
   PYTHONDONTWRITEBYTECODE).
2. ``ratio_vs_bare``: personalized (VERP, one transaction per recipient) delivery of one message
   to --recipients recipients through ``qrunner -r out --once`` (time from the runner's own
   "done (Xs)" log line) against a bare ``smtplib`` loop (its own process, timing itself) sending
   the same transactions to the same
   sink in the same run. The sink is aiosmtpd in a separate process. Median of --rounds, the
   order of the contenders alternating between rounds.
3. ``latency_median_ms`` / ``latency_p99_ms``: ``mailqctl start`` the node's master (runners:
   in with the list pipeline, out, ...), wait for one warm-up post to arrive, then post --posts
   messages one after another through ``bin/mailq-deliver`` and time each from the start of
   mailq-deliver to the sink receiving it (a list with three members, bulk delivery).
4. issue 5, the list pipeline on a 1,000-member list: ``pipeline_ms_median`` is the in-process
   per-post cost from ``bench/pipeline_cost.py`` (list load, parse, every stage, the queue writes).
   ``pipeline_share`` comes from one run of posts whose parts are all measured on the same post:
   with the master of 3. still running, --big-posts posts go to a list of 1,000 members (bulk
   delivery, 500 recipients a transaction, into the sink); for each, the in runner's own
   processing time of that post (its ``done <id> (Xs)`` log line: load, parse, stages, queue
   writes) is divided by that post's post -> delivered time (start of mailq-deliver to the sink
   receiving the last recipient's transaction), and the median of those ratios is reported.

The last line printed is one JSON object with the figures (``latency_*``, ``ratio_vs_bare``,
``deliver_vs_python``, ``pipeline_ms_median``, ``pipeline_share``, ``latency_1000_median_ms``,
``pipeline_in_runner_ms_median``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable
DELIVER = str(ROOT / "bin" / "mailq-deliver")
#: Members of the list ``big`` (issue 5's pipeline share is measured on a 1,000-member list).
BIG_MEMBERS = 1000


# -- the sink (separate process) -------------------------------------------------------------------

def run_sink(port: int, record: str) -> None:
    """``--sink PORT FILE``: accept everything; append ``bench-id time recipients`` per message."""
    import signal

    from aiosmtpd.controller import Controller

    out = open(record, "a", buffering=1)
    pattern = re.compile(rb"^X-Bench-Id: (\S+)", re.M)

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            m = pattern.search(envelope.original_content or b"")
            line = f"{m.group(1).decode() if m else '-'} {time.time():.6f} {len(envelope.rcpt_tos)}\n"
            out.write(line)
            sys.stdout.write(line)      # the bench blocks on this pipe instead of polling the file
            sys.stdout.flush()
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    signal.signal(signal.SIGTERM, lambda *a: (controller.stop(), sys.exit(0)))
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def run_bare(port: int, recipients: int) -> None:
    """``--bare PORT N``: the baseline: one smtplib connection, one VERP transaction per recipient."""
    from mailq.delivery.verp import verp_sender

    bounces = "dev-bounces@lists.example.org"
    msg = message("rate")
    rcpts = [f"reader{i}@example.net" for i in range(recipients)]
    t = time.perf_counter()
    client = smtplib.SMTP("127.0.0.1", port)
    for r in rcpts:
        client.sendmail(verp_sender(bounces, r), [r], msg)
    client.quit()
    print(f"{recipients / (time.perf_counter() - t):.3f}")


class Sink:
    def __init__(self, base: Path, port: int) -> None:
        self.record = base / "sink.txt"
        self.record.touch()
        self.proc = subprocess.Popen([PY, __file__, "--sink", str(port), str(self.record)],
                                     stdout=subprocess.PIPE, cwd=ROOT)
        if self.proc.stdout.readline().strip() != b"ready":
            raise SystemExit("the benchmark sink did not start")
        self.seen: dict[str, float] = {}      # bench id -> arrival of its latest transaction
        self.count: dict[str, int] = {}       # bench id -> recipients received so far
        self.arrived = threading.Condition()
        # A thread blocked on the sink's pipe reads every line as it comes: the pipe never fills
        # (which would stall the sink mid-SMTP) and nobody polls, so the measuring process stays
        # off the CPU while mail flows (on two cores a polling loop slows the runners it times).
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            parts = raw.split()
            if len(parts) >= 3:
                key = parts[0].decode()
                with self.arrived:
                    self.seen[key] = float(parts[1])
                    self.count[key] = self.count.get(key, 0) + int(parts[2])
                    self.arrived.notify_all()

    def arrival(self, bench_id: str, timeout: float = 60.0, recipients: int = 1) -> float | None:
        """When *bench_id* had reached *recipients* recipients at the sink (the sink's own clock:
        the arrival of the transaction that completed them); None after *timeout* seconds."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: self.count.get(bench_id, 0) >= recipients, timeout):
                return None
            return self.seen[bench_id]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


# -- helpers ---------------------------------------------------------------------------------------

def message(bench_id: str, sender: str = "member0@example.com") -> bytes:
    return (f"From: {sender}\r\nTo: dev@lists.example.org\r\nSubject: bench {bench_id}\r\n"
            f"Message-ID: <{bench_id}.{time.time()}@example.com>\r\nX-Bench-Id: {bench_id}\r\n\r\n"
            + "A line of text for the benchmark body.\r\n" * 40).encode()


def make_config(base: Path, smtp_port: int, lmtp_port: int, dns_port: int) -> Path:
    import yaml

    config = {
        "node": {"name": "bench"},
        "paths": {"var": str(base / "var"), "run": str(base / "run")},
        "smtp": {"host": "127.0.0.1", "port": smtp_port},
        "lmtp": {"host": "127.0.0.1", "port": lmtp_port, "enabled": True},
        "dns": {"nameservers": ["127.0.0.1"], "port": dns_port},   # DMARC lookups stay on loopback
    }
    path = base / "etc" / "mailq.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(env: dict, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), input=input, capture_output=True, env=env, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


# -- 1. mailq-deliver start-up ---------------------------------------------------------------------

def bench_deliver(env: dict, base: Path, runs: int) -> dict:
    msg = message("pipe")
    results = {}
    for label, extra in (("cached", {"PYTHONPYCACHEPREFIX": str(base / "pyc")}), ("no-pyc", None)):
        e = dict(env)
        if extra:
            e.pop("PYTHONDONTWRITEBYTECODE", None)
            e.update(extra)
        else:
            e["PYTHONDONTWRITEBYTECODE"] = "1"
        for _ in range(3):  # warm the byte-code cache and the settings cache
            run(e, DELIVER, "post", "dev", input=msg)
            run(e, PY, "-c", "pass")
        bare, ours = [], []
        for _ in range(runs):
            t = time.perf_counter()
            subprocess.run([PY, "-c", "pass"], env=e, cwd=ROOT, capture_output=True)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            p = subprocess.run([DELIVER, "post", "dev"], input=msg, env=e, cwd=ROOT, capture_output=True)
            ours.append(time.perf_counter() - t)
            if p.returncode != 0:
                raise SystemExit(f"mailq-deliver failed: {p.stderr.decode()}")
        results[label] = (statistics.median(bare), statistics.median(ours))
    return results


# -- 2. personalized delivery rate against bare smtplib --------------------------------------------

def bench_rate(env: dict, settings, sink: Sink, recipients: int, rounds: int) -> dict:
    from mailq.delivery.outqueue import deliver
    from mailq.delivery.smtp import SMTPConnection
    from mailq.queue import Queue

    rcpts = [f"reader{i}@example.net" for i in range(recipients)]
    bounces = "dev-bounces@lists.example.org"
    msg = message("rate")
    out = Queue.for_settings(settings, "out")
    log = settings.log_dir / "out.log"
    bare_rates, runner_rates, inproc_rates = [], [], []
    def bare() -> None:
        # bare smtplib in its own process too (like the runner), timing itself
        proc = run(env, PY, __file__, "--bare", str(settings.smtp.port), str(recipients))
        bare_rates.append(float(proc.stdout.split()[-1]))

    def runner() -> None:
        # mailq's out runner, as a process: its own "done <id> (Xs)" line is the processing time
        eid = out.enqueue(msg, {"listname": "dev", "recipients": rcpts, "envelope_sender": bounces,
                                "personalize": True}, listname="dev")
        run(env, PY, "-m", "mailq.cli.qrunner", "-r", "out", "--once")
        m = re.search(rf"done {re.escape(eid)} \(([\d.]+)s\)", log.read_text())
        if not m:
            raise SystemExit(f"out runner did not finish {eid}; see {log}")
        runner_rates.append(recipients / float(m.group(1)))

    def inproc() -> None:
        # the same delivery function in this process (no claim, no runner)
        conn = SMTPConnection(settings)
        t = time.perf_counter()
        report = deliver(settings, conn, msg, {"listname": "dev", "recipients": rcpts, "envelope_sender": bounces,
                                               "personalize": True}, lambda *a, **k: "")
        inproc_rates.append(recipients / (time.perf_counter() - t))
        conn.close()
        if len(report.delivered) != recipients:
            raise SystemExit(f"in-process delivery lost recipients: {report.summary()}")

    # The host is shared: alternate the order every round so that load drifts hit all three alike.
    order = [bare, runner, inproc]
    for i in range(rounds):
        for step in (order if i % 2 == 0 else order[::-1]):
            step()
    return {"bare": statistics.median(bare_rates), "runner": statistics.median(runner_rates),
            "inproc": statistics.median(inproc_rates)}


# -- 3. post -> delivered latency through the master ---------------------------------------------

def bench_latency(env: dict, settings, sink: Sink, posts: int, big_posts: int, big_members: int
                  ) -> tuple[list[float], list[float], list[tuple[float, float]]]:
    """(pipe latencies, LMTP latencies, big-list (latency, in-runner time) pairs), in seconds."""
    run(env, PY, "-m", "mailq.cli.ctl", "start")

    def arrival(bench_id: str, recipients: int = 1) -> float:
        at = sink.arrival(bench_id, 60, recipients)
        if at is None:
            raise SystemExit(f"{bench_id} never reached the sink; see the logs under {env['BENCH_VAR']}/log")
        return at

    try:
        piped, lmtp = [], []
        # post -1 is a warm-up, not counted: it waits for the runners to finish starting up.
        for i in range(-1, posts):
            t0 = time.time()
            run(env, DELIVER, "post", "dev", input=message(f"post{i}"))
            if i >= 0:
                piped.append(arrival(f"post{i}") - t0)
            else:
                arrival(f"post{i}")
        with smtplib.LMTP(settings.lmtp.host, settings.lmtp.port, timeout=60) as client:
            for i in range(min(posts, 30)):
                t0 = time.time()
                client.sendmail("member0@example.com", ["dev@lists.example.org"], message(f"lmtp{i}"))
                lmtp.append(arrival(f"lmtp{i}") - t0)
        # The 1,000-member list: post -> the last recipient delivered, one post at a time.
        big = []
        for i in range(-1, big_posts):
            t0 = time.time()
            run(env, DELIVER, "post", "big", input=message(f"big{i}"))
            latency = arrival(f"big{i}", big_members) - t0
            if i >= 0:
                big.append(latency)
        in_times = in_runner_times(settings.log_dir / "in.log", "big")[1:]   # [0]: the warm-up
        if len(in_times) != len(big):
            raise SystemExit(f"found {len(in_times)} in-runner times for {len(big)} posts to list big "
                             f"in {settings.log_dir / 'in.log'}")
        return piped, lmtp, list(zip(big, in_times, strict=True))
    finally:
        run(env, PY, "-m", "mailq.cli.ctl", "stop", check=False)


def in_runner_times(log: Path, listname: str) -> list[float]:
    """The in runner's processing time (seconds) of each post to *listname*, in log order.

    The runner logs ``list L: post <id> ... went through`` and then ``done <id> (Xs)``, its time
    from the claim to the finish (list load, parse, every stage, the queue writes).
    """
    text = log.read_text()
    ids = re.findall(rf"list {re.escape(listname)}: post (\S+) from .* went through", text)
    done = dict(re.findall(r"done (\S+) \(([\d.]+)s\)", text))
    return [float(done[eid]) for eid in ids if eid in done]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--sink":
        run_sink(int(sys.argv[2]), sys.argv[3])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        run_bare(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--posts", type=int, default=100, help="posts timed end to end (default 100)")
    ap.add_argument("--big-posts", type=int, default=30,
                    help="posts timed end to end to the 1,000-member list (default 30)")
    ap.add_argument("--recipients", type=int, default=500, help="recipients in the rate test (default 500)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the rate test (default 7)")
    ap.add_argument("--runs", type=int, default=40, help="runs of each program in the start-up test")
    ap.add_argument("--pipeline-posts", type=int, default=200, help="posts in the pipeline cost test (default 200)")
    ap.add_argument("--keep", action="store_true", help="keep the temp tree (logs) for a look")
    ap.add_argument("--deliver-only", action="store_true", help="only measurement 1 (mailq-deliver start-up)")
    args = ap.parse_args()

    from mailq.config import load_settings
    from mailq.loopdns import LoopDNS
    from tests.support import free_port

    base = Path(tempfile.mkdtemp(prefix="mailq-flow-"))
    sink = None
    dns = LoopDNS(negative_ttl=3600).__enter__()   # no DMARC records: every lookup says NXDOMAIN
    try:
        smtp_port = free_port()
        config = make_config(base, smtp_port, free_port(), dns.port)
        env = dict(os.environ, MAILQ_CONFIG=str(config), PYTHONPATH=str(ROOT), BENCH_VAR=str(base / "var"))
        env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
        settings = load_settings(config)
        run(env, PY, "-m", "mailq.cli.ctl", "lists", "create", "dev", "--owner", "owner@example.org",
            "--domain", "lists.example.org")
        members = "".join(f"member{i}@example.com\n" for i in range(3)).encode()
        run(env, PY, "-m", "mailq.cli.ctl", "members", "add", "dev", "-", "--no-welcome", input=members)
        run(env, PY, "-m", "mailq.cli.ctl", "lists", "create", "big", "--owner", "owner@example.org",
            "--domain", "lists.example.org")
        members = "".join(f"member{i}@example.com\n" for i in range(BIG_MEMBERS)).encode()
        run(env, PY, "-m", "mailq.cli.ctl", "members", "add", "big", "-", "--no-welcome", input=members)
        sink = Sink(base, smtp_port)

        startup = bench_deliver(env, base, args.runs)
        if args.deliver_only:
            (cached_bare, cached_ours), (raw_bare, raw_ours) = startup["cached"], startup["no-pyc"]
            print(f"python -c pass {cached_bare * 1000:.1f} ms, mailq-deliver post {cached_ours * 1000:.1f} ms "
                  f"(byte-code cached; without: {raw_bare * 1000:.1f} / {raw_ours * 1000:.1f} ms), "
                  f"median of {args.runs}")
            print(json.dumps({"deliver_vs_python": round(cached_ours / cached_bare, 2),
                              "deliver_ms": round(cached_ours * 1000, 1), "python_ms": round(cached_bare * 1000, 1),
                              "deliver_vs_python_no_pyc": round(raw_ours / raw_bare, 2)}))
            return
        # the start-up runs queued posts into `in`; nothing serves it yet, so clear them away
        shutil.rmtree(settings.queue_dir("in"), ignore_errors=True)
        rates = bench_rate(env, settings, sink, args.recipients, args.rounds)
        latencies, lmtp_latencies, big = bench_latency(env, settings, sink, args.posts, args.big_posts,
                                                       BIG_MEMBERS)
    finally:
        if sink is not None:
            sink.stop()
        dns.__exit__(None, None, None)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    cached_bare, cached_ours = startup["cached"]
    raw_bare, raw_ours = startup["no-pyc"]
    result = {
        "latency_median_ms": round(statistics.median(latencies) * 1000, 1),
        "latency_p99_ms": round(pct(latencies, 0.99) * 1000, 1),
        "ratio_vs_bare": round(rates["runner"] / rates["bare"], 3),
        "deliver_vs_python": round(cached_ours / cached_bare, 2),
    }
    # Issue 5: what the list pipeline costs per post (1,000-member list, fsync on), in process; and
    # its share of one post's whole trip, both parts measured on the same post (see the docstring).
    sys.path.insert(0, str(ROOT / "bench"))
    from pipeline_cost import bench_pipeline

    pipe = bench_pipeline(members=1000, posts=args.pipeline_posts)
    big_latencies = [lat for lat, _ in big]
    result["pipeline_ms_median"] = round(pipe["pipeline_ms_median"], 2)
    result["pipeline_share"] = round(statistics.median(t / lat for lat, t in big), 3)
    result["latency_1000_median_ms"] = round(statistics.median(big_latencies) * 1000, 1)
    result["pipeline_in_runner_ms_median"] = round(statistics.median(t for _, t in big) * 1000, 1)
    rows = [
        ("post -> delivered, median", f"{result['latency_median_ms']} ms", f"{len(latencies)} posts, mailqctl start"),
        ("post -> delivered, p99", f"{result['latency_p99_ms']} ms", "pipe -> in (pipeline) -> out -> sink"),
        ("post -> delivered, min/max", f"{min(latencies) * 1000:.1f} / {max(latencies) * 1000:.1f} ms", ""),
        ("same by LMTP, median", f"{statistics.median(lmtp_latencies) * 1000:.1f} ms",
         f"{len(lmtp_latencies)} posts over one LMTP connection"),
        ("bare smtplib, personalized", f"{rates['bare']:.0f} rcpt/s", f"{args.recipients} transactions, "
         f"median of {args.rounds}"),
        ("out runner, personalized", f"{rates['runner']:.0f} rcpt/s", "qrunner -r out --once, runner's time"),
        ("deliver() in-process", f"{rates['inproc']:.0f} rcpt/s", "same code, no runner"),
        ("ratio_vs_bare", f"{result['ratio_vs_bare']}", "out runner / bare (target >= 0.8)"),
        ("python -c pass", f"{cached_bare * 1000:.1f} ms", f"median of {args.runs}"),
        ("mailq-deliver post", f"{cached_ours * 1000:.1f} ms", "bin/mailq-deliver, byte-code cached"),
        ("deliver_vs_python", f"{result['deliver_vs_python']}", "target <= 2"),
        ("pipeline per post", f"{result['pipeline_ms_median']} ms",
         f"median of {args.pipeline_posts}, 1,000-member list, fsync on"),
        ("1,000 members: post -> delivered", f"{result['latency_1000_median_ms']} ms",
         f"median of {len(big)}, to the last recipient, bulk"),
        ("1,000 members: in runner", f"{result['pipeline_in_runner_ms_median']} ms",
         "median, the runner's time for those posts"),
        ("pipeline_share", f"{result['pipeline_share']}", "median of in runner / post -> delivered, per post"),
        ("  same, no byte-code cache", f"{raw_ours / raw_bare:.2f}",
         f"{raw_ours * 1000:.1f} vs {raw_bare * 1000:.1f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value'.ljust(vwidth)}  notes")
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value.ljust(vwidth)}  {note}".rstrip())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
