"""Benchmark fan-out: one post to a big list, mailq's out runner against a bare smtplib client.

    python bench/fanout.py [--members 20000] [--connections 4] [--rounds 3] [--kill-members 5000]

The sink is Postfix's ``smtp-sink`` (written in C, so it is not the limit): found on PATH or in
/usr/sbin, else installed with apt-get when running as root (the bench says which). Without it the
bench falls back to an aiosmtpd sink in its own process and prints that the figures are sink-bound.

Measured in one run, in a fresh temp tree, each figure the median of --rounds, the order of the
contenders alternating between rounds (the host is shared):

* ``bulk_rcpt_per_s``: one ``qrunner -r out --once`` process delivering one bulk entry (500
  recipients a transaction) to --members members; time from the runner's own ``done <id> (Xs)``.
* ``personalized_rcpt_per_s_1`` / ``personalized_rcpt_per_s_N``: the same for a personalized
  entry (VERP, one transaction a member, one-click ``List-Unsubscribe`` per copy) with
  ``smtp.connections`` 1 and --connections.
* ``bare_bulk_rcpt_per_s``, ``bare_personalized_rcpt_per_s_1`` / ``_N``: a bare ``smtplib`` loop
  (``sendmail``, one connection, or N threads with one connection each) sending the same
  transactions (same envelope senders, same message size) to the same sink.
* ``ratio_personalized_vs_bare`` = mailq personalized / bare personalized, one connection each
  (target >= 0.9); ``connections_speedup`` = mailq personalized with N sessions / with 1 (target
  >= 1.5 with 4 sessions on two cores); ``connections_speedup_paired`` the median of the per-round
  ratios.
* ``checkpoint_overhead``: 1 - mailq personalized (one session) with checkpoints every
  ``smtp.checkpoint_every`` transactions (the default, 100) / with ``checkpoint_every: 0``.
* ``resent_after_kill``: a personalized post to --kill-members members through a real out runner
  (N sessions) into a counting aiosmtpd sink; SIGKILL when half the members have their copy; a
  new runner recovers the claim and finishes; the copies received twice are counted (target: at
  most ``checkpoint_window`` = ``smtp.checkpoint_every`` + N - 1, docs/mail-flow.md "Checkpoints").

The last line printed is one JSON object with these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PY = sys.executable
BOUNCES = "dev-bounces@lists.example.org"


def find_smtp_sink() -> tuple[str | None, str]:
    """(path, how) of Postfix's smtp-sink, installing postfix with apt-get when root and missing."""
    for path in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink"):
        if path and os.access(path, os.X_OK):
            return path, f"found {path}"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(["apt-get", "install", "-y", "postfix"], env=env, capture_output=True)
        if proc.returncode == 0 and os.access("/usr/sbin/smtp-sink", os.X_OK):
            return "/usr/sbin/smtp-sink", "installed postfix with apt-get for /usr/sbin/smtp-sink"
        return None, f"apt-get install postfix failed: {proc.stderr.decode(errors='replace')[-200:]}"
    return None, "smtp-sink not found and not root (cannot install postfix)"


def start_sink(port: int) -> tuple[subprocess.Popen, str]:
    path, how = find_smtp_sink()
    if path:
        cmd = [path] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"127.0.0.1:{port}", "512"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        label = f"Postfix smtp-sink ({how})"
    else:
        proc = subprocess.Popen([PY, __file__, "--aiosmtpd-sink", str(port)], stdout=subprocess.DEVNULL)
        label = f"aiosmtpd sink ({how}): FIGURES ARE SINK-BOUND"
    from tests.support import wait_for

    wait_for(lambda: _connects(port), 30, message="the sink listening")
    return proc, label


def _connects(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def aiosmtpd_sink(port: int, counts: Counter | None = None) -> object:
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            if counts is not None:
                counts.update(r.lower() for r in envelope.rcpt_tos)
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def message() -> bytes:
    """A list post as the pipeline leaves it (List-* headers, a footer), about 3 kB."""
    return ("From: member0@example.com\r\nTo: dev@lists.example.org\r\nSubject: [dev] fan-out\r\n"
            f"Message-ID: <fanout.{time.time()}@example.com>\r\nList-Id: <dev.lists.example.org>\r\n"
            "List-Unsubscribe: <mailto:dev-leave@lists.example.org>\r\n"
            "List-Post: <mailto:dev@lists.example.org>\r\n\r\n"
            + "A line of text for the fan-out benchmark, about as long as a line of mail.\r\n" * 40
            + "-- \r\ndev mailing list\r\ndev@lists.example.org\r\n").encode()


def bare(port: int, rcpts: list[str], msg: bytes, personalize: bool, connections: int) -> float:
    """Recipients a second of a bare smtplib loop (``connections`` threads, one connection each)."""
    from mailq.delivery.verp import verp_sender

    if personalize:
        work = [(verp_sender(BOUNCES, r), [r]) for r in rcpts]
    else:
        work = [(BOUNCES, rcpts[i:i + 500]) for i in range(0, len(rcpts), 500)]
    it = iter(work)
    lock = threading.Lock()

    def loop() -> None:
        client = smtplib.SMTP("127.0.0.1", port)
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                break
            client.sendmail(item[0], item[1], msg)
        client.quit()

    t = time.perf_counter()
    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(rcpts) / (time.perf_counter() - t)


def make_config(base: Path, name: str, port: int, connections: int, **smtp: object) -> Path:
    import yaml

    config = {"node": {"name": "bench"}, "paths": {"var": str(base / "var"), "run": str(base / "run")},
              "smtp": {"host": "127.0.0.1", "port": port, "connections": connections, **smtp},
              "pipeline": {"web_url": "https://lists.example.org"}}
    path = base / "etc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def environment(config: Path) -> dict:
    env = dict(os.environ, MAILQ_CONFIG=str(config), PYTHONPATH=str(ROOT))
    env["PATH"] = os.path.dirname(PY) + os.pathsep + env.get("PATH", "")
    return env


def runner_rate(config: Path, rcpts: list[str], msg: bytes, personalize: bool) -> float:
    """Recipients a second of one ``qrunner -r out --once`` process, from its own log line."""
    from mailq.config import load_settings
    from mailq.queue import Queue

    settings = load_settings(config)
    eid = Queue.for_settings(settings, "out").enqueue(
        msg, {"listname": "dev", "recipients": rcpts, "envelope_sender": BOUNCES, "personalize": personalize},
        listname="dev")
    proc = subprocess.run([PY, "-m", "mailq.cli.qrunner", "-r", "out", "--once"], env=environment(config),
                          cwd=ROOT, capture_output=True, timeout=900)
    log = (settings.log_dir / "out.log").read_text()
    m = re.search(rf"done {re.escape(eid)} \(([\d.]+)s\)", log)
    summary = re.search(rf"{re.escape(eid)}: (\d+) delivered", log)
    if proc.returncode != 0 or not m or not summary or int(summary.group(1)) != len(rcpts):
        raise SystemExit(f"out runner did not deliver {eid} fully ({proc.returncode}); see {settings.log_dir}")
    return len(rcpts) / float(m.group(1))


def resent_after_kill(base: Path, members: int, connections: int) -> tuple[int, int, int]:
    """(copies received twice, copies received in all, the checkpoint window) when the out runner
    is SIGKILLed at 50 %."""
    from mailq.config import load_settings
    from mailq.queue import Queue
    from tests.support import free_port, wait_for

    port = free_port()
    counts: Counter = Counter()
    controller = aiosmtpd_sink(port, counts)
    try:
        kbase = base / "kill"
        config = make_config(kbase, "mailq.yaml", port, connections)
        settings = load_settings(config)
        window = settings.smtp.checkpoint_every + connections - 1 if settings.smtp.checkpoint_every else members
        rcpts = [f"k{i}@example.net" for i in range(members)]
        Queue.for_settings(settings, "out").enqueue(
            message(), {"listname": "dev", "recipients": rcpts, "envelope_sender": BOUNCES, "personalize": True},
            listname="dev")
        runner = subprocess.Popen([PY, "-m", "mailq.cli.qrunner", "-r", "out"], env=environment(config), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: sum(counts.values()) >= members // 2, 600, interval=0.005, message="half delivered")
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        # The successor: this node's dead claim is recovered, then the entry delivered again.
        subprocess.run([PY, "-m", "mailq.cli.ctl", "queue", "recover"], env=environment(config), cwd=ROOT,
                       capture_output=True, timeout=300)
        subprocess.run([PY, "-m", "mailq.cli.qrunner", "-r", "out", "--once"], env=environment(config), cwd=ROOT,
                       capture_output=True, timeout=900)
        missing = [r for r in rcpts if counts[r] == 0]
        if missing:
            raise SystemExit(f"{len(missing)} members got no copy after the kill (e.g. {missing[0]})")
        return sum(c - 1 for c in counts.values() if c > 1), sum(counts.values()), window
    finally:
        controller.stop()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--aiosmtpd-sink":
        aiosmtpd_sink(int(sys.argv[2]))
        signal.sigwait({signal.SIGTERM})
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=20000, help="list members (default 20000)")
    ap.add_argument("--connections", type=int, default=4, help="smtp.connections for the N figures (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median (default 3)")
    ap.add_argument("--kill-members", type=int, default=5000,
                    help="members of the post whose out runner is SIGKILLed at 50 %% (default 5000)")
    args = ap.parse_args()
    from tests.support import free_port

    base = Path(tempfile.mkdtemp(prefix="mailq-fanout-"))
    port = free_port()
    sink, label = start_sink(port)
    try:
        print(f"sink: {label}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        one = make_config(base, "one.yaml", port, 1)
        many = make_config(base, "many.yaml", port, args.connections)
        unchecked = make_config(base, "nockpt.yaml", port, 1, checkpoint_every=0)
        rcpts = [f"reader{i}@example.net" for i in range(args.members)]
        msg = message()
        n = args.connections
        steps = {
            "bulk_rcpt_per_s": lambda: runner_rate(one, rcpts, msg, False),
            "bare_bulk_rcpt_per_s": lambda: bare(port, rcpts, msg, False, 1),
            "personalized_rcpt_per_s_1": lambda: runner_rate(one, rcpts, msg, True),
            "bare_personalized_rcpt_per_s_1": lambda: bare(port, rcpts, msg, True, 1),
            f"personalized_rcpt_per_s_{n}": lambda: runner_rate(many, rcpts, msg, True),
            f"bare_personalized_rcpt_per_s_{n}": lambda: bare(port, rcpts, msg, True, n),
            "personalized_rcpt_per_s_1_no_checkpoints": lambda: runner_rate(unchecked, rcpts, msg, True),
        }
        figures: dict[str, list[float]] = {k: [] for k in steps}
        order = list(steps)
        for i in range(args.rounds):
            for key in (order if i % 2 == 0 else order[::-1]):
                figures[key].append(steps[key]())
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in figures.items()), flush=True)
        result: dict[str, object] = {k: round(statistics.median(v)) for k, v in figures.items()}
        result["ratio_personalized_vs_bare"] = round(
            statistics.median(figures["personalized_rcpt_per_s_1"])
            / statistics.median(figures["bare_personalized_rcpt_per_s_1"]), 3)
        result["connections_speedup"] = round(
            statistics.median(figures[f"personalized_rcpt_per_s_{n}"])
            / statistics.median(figures["personalized_rcpt_per_s_1"]), 3)
        # The same ratio per round (both measured minutes apart at most), median: less hit by the load
        # of a shared machine drifting between rounds than the ratio of the two medians.
        pairs = zip(figures[f"personalized_rcpt_per_s_{n}"], figures["personalized_rcpt_per_s_1"], strict=True)
        result["connections_speedup_paired"] = round(statistics.median(a / b for a, b in pairs), 3)
        result["checkpoint_overhead"] = round(
            1 - statistics.median(figures["personalized_rcpt_per_s_1"])
            / statistics.median(figures["personalized_rcpt_per_s_1_no_checkpoints"]), 3)
        result["spread"] = {k: [round(min(v)), round(max(v))] for k, v in figures.items()}
        resent, received, window = resent_after_kill(base, args.kill_members, n)
        result.update({"resent_after_kill": resent, "checkpoint_window": window, "kill_members": args.kill_members,
                       "kill_received": received, "connections": n, "members": args.members,
                       "sink": "smtp-sink" if "smtp-sink" in label else "aiosmtpd (sink-bound)",
                       "load_average": round(os.getloadavg()[0], 1)})
        print(f"personalized: mailq {result['personalized_rcpt_per_s_1']}/s vs bare "
              f"{result['bare_personalized_rcpt_per_s_1']}/s (ratio {result['ratio_personalized_vs_bare']}, "
              f"target >= 0.9); {n} sessions: x{result['connections_speedup']} (target >= 1.5); "
              f"resent after SIGKILL at 50 %: {resent} of {args.kill_members} (target <= checkpoint window "
              f"{window}); checkpoints cost {result['checkpoint_overhead']:.1%}")
        print(json.dumps(result))
    finally:
        sink.terminate()
        sink.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
