"""Benchmark email commands end to end: -join requests and their confirmations, against posts.

    python bench/commands.py [--joins 2000] [--posts 2000] [--keep]

In a fresh temp tree with its own node config, ``mailqctl start`` runs the node's master (every
runner, the ``commands`` runner included) delivering to an aiosmtpd sink in its own process.  Two
measurements, in one run, through the same runners:

1. ``posts_per_s``: --posts posts (``bench/flow.py``'s post message, one member) are written into
   ``in`` at once with mailq-deliver's own writer; the rate is posts over the time until the sink
   has them all.
2. ``commands_per_s``: --joins ``-join`` requests from distinct addresses are written into
   ``commands`` at once; each confirmation that reaches the sink is answered at once as a mail
   client's Reply (``Re: confirm TOKEN`` to ``LIST-confirm+TOKEN``), and the run ends when the sink
   has every welcome.  Each subscription is two commands (the join and the confirmation), so the
   rate is ``2 * joins`` over that time.

``ratio_vs_posts`` = commands_per_s / posts_per_s (target >= 0.5: a command costs at most two
posts).  The last line printed is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from flow import PY, make_config, message, run  # noqa: E402  (bench/flow.py: one post flow for both)

DOMAIN = "lists.example.org"


def run_sink(port: int) -> None:
    """``--sink PORT``: accept everything; print ``KIND KEY RECIPIENT`` per message.

    KIND is ``confirm`` (KEY the token), ``welcome``, ``post`` or ``other``.
    """
    import signal

    from aiosmtpd.controller import Controller

    subject_re = re.compile(rb"^Subject: (.*)$", re.M)

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            head = (envelope.original_content or b"").split(b"\r\n\r\n", 1)[0]
            m = subject_re.search(head)
            subject = m.group(1).strip().decode("utf-8", "replace") if m else ""
            rcpt = envelope.rcpt_tos[0] if envelope.rcpt_tos else "-"
            if subject.startswith("confirm "):
                line = f"confirm {subject.split()[1]} {rcpt}"
            elif subject.startswith("Welcome to"):
                line = f"welcome - {rcpt}"
            elif subject.startswith("bench "):
                line = f"post - {rcpt}"
            else:
                line = f"other - {rcpt}"
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    signal.signal(signal.SIGTERM, lambda *a: (controller.stop(), sys.exit(0)))
    print("ready", flush=True)
    while True:
        time.sleep(3600)


class Sink:
    """The sink process; ``on_confirm(token, rcpt)`` is called for every confirmation as it arrives."""

    def __init__(self, port: int, on_confirm) -> None:
        self.proc = subprocess.Popen([PY, __file__, "--sink", str(port)], stdout=subprocess.PIPE, cwd=ROOT)
        if self.proc.stdout.readline().strip() != b"ready":
            raise SystemExit("the benchmark sink did not start")
        self.counts: dict[str, int] = {}
        self.cond = threading.Condition()
        self.on_confirm = on_confirm
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            kind, key, rcpt = raw.decode().split()
            if kind == "confirm":
                self.on_confirm(key, rcpt)
            with self.cond:
                self.counts[kind] = self.counts.get(kind, 0) + 1
                self.cond.notify_all()

    def wait(self, kind: str, count: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.counts.get(kind, 0) >= count, timeout):
                raise SystemExit(f"timed out: {self.counts.get(kind, 0)} of {count} {kind} mails at the sink")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--sink":
        run_sink(int(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--joins", type=int, default=2000, help="-join requests (default 2000)")
    ap.add_argument("--posts", type=int, default=2000, help="posts for the comparison (default 2000)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each phase")
    ap.add_argument("--keep", action="store_true", help="keep the temp tree (logs) for a look")
    args = ap.parse_args()

    from mailq.config import load_settings
    from mailq.loopdns import LoopDNS
    from mailq.queue.entry import enqueue_message
    from tests.support import free_port

    base = Path(tempfile.mkdtemp(prefix="mailq-commands-"))
    sink = None
    env = None
    dns = LoopDNS(negative_ttl=3600).__enter__()   # as bench/flow.py: posts' DMARC lookups stay on loopback
    try:
        smtp_port = free_port()
        config = make_config(base, smtp_port, free_port(), dns.port)
        env = dict(os.environ, MAILQ_CONFIG=str(config), PYTHONPATH=str(ROOT))
        settings = load_settings(config)
        ctl = [PY, "-m", "mailq.cli.ctl"]
        run(env, *ctl, "lists", "create", "dev", "--owner", "owner@example.org", "--domain", DOMAIN)
        run(env, *ctl, "members", "add", "dev", "-", "--no-welcome", input=b"member0@example.com\n")
        run(env, *ctl, "lists", "create", "club", "--owner", "owner@example.org", "--domain", DOMAIN)
        # the list accepts posts from its member only: bench/flow.py's message comes from member0
        commands_dir, in_dir = settings.queue_dir("commands"), settings.queue_dir("in")

        def answer(token: str, rcpt: str) -> None:
            """A mail client's Reply to the confirmation, as the MTA would queue it."""
            to = f"club-confirm+{token}@{DOMAIN}"
            msg = (f"From: {rcpt}\r\nTo: {to}\r\nSubject: Re: confirm {token}\r\n"
                   f"Message-ID: <{token}.reply@example.net>\r\n\r\n> confirm\r\n").encode()
            enqueue_message(commands_dir, msg, {"listname": "club", "kind": "confirm", "received": time.time(),
                                            "via": "pipe", "envelope_sender": rcpt, "original_recipient": to},
                        fsync=settings.queue.fsync)

        sink = Sink(smtp_port, answer)
        run(env, *ctl, "start")
        # warm-up: one post through every runner before anything is timed
        enqueue_message(in_dir, message("warm"), {"listname": "dev", "kind": "post", "received": time.time(),
                                              "via": "pipe", "envelope_sender": "member0@example.com"},
                    fsync=settings.queue.fsync)
        sink.wait("post", 1, 120)

        t0 = time.perf_counter()
        for i in range(args.posts):
            enqueue_message(in_dir, message(f"p{i}"), {"listname": "dev", "kind": "post", "received": time.time(),
                                                   "via": "pipe", "envelope_sender": "member0@example.com"},
                        fsync=settings.queue.fsync)
        sink.wait("post", 1 + args.posts, args.timeout)
        post_s = time.perf_counter() - t0
        print(f"posts:    {args.posts} in {post_s:.1f}s = {args.posts / post_s:.1f}/s", flush=True)

        t0 = time.perf_counter()
        for i in range(args.joins):
            sender = f"joiner{i}@example.net"
            msg = (f"From: {sender}\r\nTo: club-join@{DOMAIN}\r\nSubject: join\r\n"
                   f"Message-ID: <join{i}@example.net>\r\n\r\nplease\r\n").encode()
            enqueue_message(commands_dir, msg, {"listname": "club", "kind": "join", "received": time.time(),
                                            "via": "pipe", "envelope_sender": sender}, fsync=settings.queue.fsync)
        sink.wait("welcome", args.joins, args.timeout)
        command_s = time.perf_counter() - t0
        commands = 2 * args.joins
        print(f"commands: {commands} ({args.joins} joins + confirmations) in {command_s:.1f}s = "
              f"{commands / command_s:.1f}/s", flush=True)
        from mailq.lists import ListStore

        members = len(ListStore(settings).load("club").members)
        if members != args.joins:
            raise SystemExit(f"club has {members} members, expected {args.joins}")
        posts_per_s, commands_per_s = args.posts / post_s, commands / command_s
        result = {"posts_per_s": round(posts_per_s, 2), "commands_per_s": round(commands_per_s, 2),
                  "ratio_vs_posts": round(commands_per_s / posts_per_s, 3), "joins": args.joins,
                  "posts": args.posts, "target_ratio": 0.5}
    finally:
        if env is not None:
            subprocess.run([PY, "-m", "mailq.cli.ctl", "stop", "--timeout", "60"], env=env, cwd=ROOT,
                           capture_output=True, timeout=120)
        if sink is not None:
            sink.stop()
        dns.__exit__(None, None, None)
        if args.keep:
            print(f"temp tree kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
