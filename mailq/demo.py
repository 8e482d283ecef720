"""The main job, end to end: ``python3 dev.py demo``.

Sets up a fresh ``var/`` in a folder it names, starts an SMTP sink on loopback, creates a list with
members, writes a slice map that splits the work between two nodes sharing that ``var/`` (a local
cluster), starts both masters with ``mailqctl start``, posts through the MTA pipe
(``mailq-deliver``) and through LMTP, waits until every member has the mail, prints who received
what and how long it took, and stops everything cleanly.  Every step is a real command, the same an
operator would run.
"""
from __future__ import annotations

import email
import json
import os
import shutil
import smtplib
import subprocess
import sys
import threading
import time
from email.utils import parseaddr
from pathlib import Path

import click
import yaml

from mailq.config import CHECKOUT, RUNNER_QUEUES
from mailq.loopdns import LoopDNS

NODES = ("demo1", "demo2")
#: Header naming each demo post, so deliveries are matched to posts exactly.
TAG = "X-Mailq-Demo-Post"
LIST = "demo"
DOMAIN = "lists.example.org"
MEMBERS = [
    ("Ada Lovelace", "ada@example.org", []),
    ("Alan Turing", "alan@example.net", []),
    ("Grace Hopper", "grace@example.com", []),
    ("Edsger Dijkstra", "edsger@example.org", []),
    ("Barbara Liskov", "barbara@example.net", ["--disable"]),   # disabled: must get nothing
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    """An aiosmtpd SMTP server standing in for the smarthost; records each delivery."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.received: list[tuple[float, str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd hook name)
        with self.lock:
            self.received.append((time.time(), envelope.mail_from, list(envelope.rcpt_tos),
                                  bytes(envelope.original_content or envelope.content)))
        return "250 OK"

    def start(self) -> None:
        from aiosmtpd.controller import Controller

        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


class Demo:
    def __init__(self, base: Path, posts: int) -> None:
        self.base = base
        self.var = base / "var"
        self.posts = posts
        self.sink = Sink()
        # The demo's DNS, on loopback: the poster's domain publishes DMARC p=reject, so the list
        # sends the copies From: "Poster via dev" (stage dmarc); no query ever leaves the machine.
        self.dns = LoopDNS({("_dmarc.example.com", "TXT"): ["v=DMARC1; p=reject"]}, negative_ttl=3600)
        self.lmtp_port = _free_port()
        self.configs: dict[str, Path] = {}

    # -- helpers ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        click.echo(text, err=False)

    def run(self, node: str, program: str, *args: str, input: bytes | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        module = {"mailqctl": "mailq.cli.ctl",
                  "mailq-deliver": "mailq.mta.deliver"}[program]
        env = dict(os.environ, MAILQ_CONFIG=str(self.configs[node]))
        env["PYTHONPATH"] = str(CHECKOUT) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", module, *args], input=input, capture_output=True,
                              env=env, cwd=CHECKOUT, timeout=120)
        if check and proc.returncode != 0:
            raise click.ClickException(
                f"`{program} {' '.join(args)}` on {node} exited {proc.returncode}:\n"
                f"{proc.stdout.decode(errors='replace')}{proc.stderr.decode(errors='replace')}")
        return proc

    # -- steps -----------------------------------------------------------------------------
    def setup(self) -> None:
        if self.base.exists():
            shutil.rmtree(self.base)
        self.var.mkdir(parents=True)
        for node in NODES:
            config = {
                "node": {"name": node},
                "paths": {"var": str(self.var), "run": str(self.base / "run")},
                "smtp": {"host": "127.0.0.1", "port": self.sink.port},
                "dns": {"nameservers": ["127.0.0.1"], "port": self.dns.port},
                "lmtp": {"host": "127.0.0.1", "port": self.lmtp_port, "enabled": node == NODES[0]},
                "cluster": {"failover": "auto", "heartbeat": 1, "lease": 5, "margin": 1},
                "runners": {"poll_interval": 0.5, "slices": {q: (2 if q in ("in", "out") else 1)
                                                             for q in RUNNER_QUEUES}},
            }
            path = self.base / f"{node}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            self.configs[node] = path
        self.say(f"1. fresh var/ in {self.var}; node configs {', '.join(str(p) for p in self.configs.values())}")
        self.sink.start()
        self.dns.__enter__()
        self.say(f"2. SMTP sink (the smarthost) listening on 127.0.0.1:{self.sink.port}; DNS on "
                 f"127.0.0.1:{self.dns.port} (example.com publishes DMARC p=reject)")

        a = NODES[0]
        self.run(a, "mailqctl", "lists", "create", LIST, "--owner", "owner@example.org", "--domain", DOMAIN)
        addresses = "".join(f"{name} <{addr}>\n" for name, addr, _ in MEMBERS).encode()
        self.run(a, "mailqctl", "members", "add", LIST, "-", "--no-welcome", input=addresses)
        for _, addr, flags in MEMBERS:
            if flags:
                self.run(a, "mailqctl", "members", "set", LIST, addr, *flags)
        self.run(a, "mailqctl", "config", "set", LIST, "nonmember_action=accept")
        enabled = len([m for m in MEMBERS if not m[2]])
        self.say(f"3. list {LIST}@{DOMAIN} with {len(MEMBERS)} members ({enabled} enabled, 1 disabled)")

        self.run(a, "mailqctl", "slices", "init", "--nodes", ",".join(NODES))
        shown = json.loads(self.run(a, "mailqctl", "slices", "show", "--json").stdout)
        spread = "; ".join(f"{q}: " + ", ".join(f"{n} runs slice {'+'.join(map(str, s))}"
                                                 for n, s in shown["queues"][q]["nodes"].items())
                           for q in ("in", "out"))
        self.say(f"4. slice map (epoch {shown['epoch']}) splits the work: {spread}")

    def start(self) -> None:
        for node in NODES:
            self.run(node, "mailqctl", "start")
        status = json.loads(self.run(NODES[0], "mailqctl", "cluster", "status", "--json").stdout)
        states = {n["node"]: n["state"] for n in status.get("nodes", [])}
        alive = [n for n in NODES if states.get(n) == "alive"]
        self.say(f"5. masters started on {', '.join(NODES)} (cluster status: {len(alive)} alive)")

    def post(self) -> dict[str, float]:
        sent: dict[str, float] = {}
        for i in range(self.posts):
            subject = f"Hello from the pipe #{i + 1}"
            msg = (f"From: Poster <poster@example.com>\r\nTo: {LIST}@{DOMAIN}\r\nSubject: {subject}\r\n"
                   f"{TAG}: {subject}\r\n"
                   f"Message-ID: <pipe{i}@example.com>\r\n\r\nPosted through mailq-deliver.\r\n").encode()
            sent[subject] = time.time()
            self.run(NODES[1], "mailq-deliver", "post", LIST, input=msg)
        subject = "Hello over LMTP"
        msg = (f"From: Poster <poster@example.com>\r\nTo: {LIST}@{DOMAIN}\r\nSubject: {subject}\r\n"
               f"{TAG}: {subject}\r\n"
               f"Message-ID: <lmtp@example.com>\r\n\r\nPosted over LMTP.\r\n").encode()
        deadline = time.time() + 20
        while True:
            try:
                with smtplib.LMTP("127.0.0.1", self.lmtp_port) as lmtp:
                    sent[subject] = time.time()
                    lmtp.sendmail("poster@example.com", [f"{LIST}@{DOMAIN}"], msg)
                break
            except OSError:
                if time.time() > deadline:
                    raise click.ClickException(f"the LMTP runner never listened on 127.0.0.1:{self.lmtp_port}")
                time.sleep(0.2)
        self.say(f"6. posted {self.posts} message(s) with mailq-deliver and 1 over LMTP (port {self.lmtp_port})")
        return sent

    def wait(self, sent: dict[str, float], timeout: float = 60) -> dict[str, dict[str, list[float]]]:
        enabled = [addr for _, addr, flags in MEMBERS if not flags]
        want = len(sent) * len(enabled)
        deadline = time.time() + timeout
        got: dict[str, dict[str, list[float]]] = {}
        while time.time() < deadline:
            got = {}
            with self.sink.lock:
                received = list(self.sink.received)
            for at, _sender, rcpts, data in received:
                # Matched by our own header, exactly: the list adds a subject prefix, and a
                # substring match would read "#10" as "#1" too.
                key = str(email.message_from_bytes(data).get(TAG, "")).strip()
                for r in rcpts:
                    got.setdefault(r, {}).setdefault(key, []).append(at)
            if sum(len(v) for v in got.values()) >= want:
                break
            time.sleep(0.1)
        return got

    def report(self, sent: dict[str, float], got: dict[str, dict[str, list[float]]]) -> bool:
        self.say("7. what each member received:")
        ok = True
        for name, addr, flags in MEMBERS:
            mails = got.get(addr, {})
            expected = 0 if flags else len(sent)
            state = "disabled" if flags else "enabled"
            lat = [1000 * (min(mails[s]) - sent[s]) for s in mails if s in sent]
            timing = f", post->delivery {min(lat):.0f}-{max(lat):.0f} ms" if lat else ""
            copies = sum(len(times) for times in mails.values())
            unknown = [s for s in mails if s not in sent]
            good = len(mails) == expected and copies == expected and not unknown
            mark = "ok" if good else ("DOUBLED" if copies > len(mails) else "UNKNOWN" if unknown else "MISSING")
            ok &= good
            self.say(f"   {mark:7} {name} <{addr}> ({state}): {copies}/{expected} messages{timing}")
        copies = sum(len(r[2]) for r in self.sink.received)
        self.say(f"   sink accepted {len(self.sink.received)} SMTP transactions, {copies} recipient copies")
        if self.sink.received:
            sample = email.message_from_bytes(self.sink.received[0][3])
            self.say(f"   a delivered copy: From: {sample['From']!s} (DMARC p=reject: munged) | Reply-To: "
                     f"{sample['Reply-To']!s}")
            self.say(f"   Subject: {sample['Subject']!s} | List-Id: {sample['List-Id']!s}"
                     f" | envelope sender {parseaddr(self.sink.received[0][1])[1]}")
        return ok

    def stop(self) -> bool:
        """Stop both masters and the sink; False (after saying why) when a master did not stop."""
        ok = True
        for node in NODES:
            proc = self.run(node, "mailqctl", "stop", check=False)
            if proc.returncode != 0:
                ok = False
                self.say(f"   FAILED: `mailqctl stop` on {node} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).decode(errors='replace').strip()}")
        self.sink.stop()
        self.dns.__exit__(None, None, None)
        waiting = self.run(NODES[0], "mailqctl", "queue", "count", "--json", check=False).stdout.decode()
        self.say(f"8. masters stopped, sink closed; queue counts now: {_compact_counts(waiting)}")
        logs = sorted(str(p.relative_to(self.base)) for p in self.var.glob("log/*/*.log"))
        self.say(f"   logs: {', '.join(logs[:6])}{' ...' if len(logs) > 6 else ''}")
        return ok


def _compact_counts(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip() or "(unavailable)"
    queues = data.get("queues", data)
    parts = []
    for name, info in sorted(queues.items()):
        if isinstance(info, dict):
            total = sum(v for k, v in info.items() if isinstance(v, int) and k in ("waiting", "claimed"))
            parts.append(f"{name}={total}")
    return " ".join(parts) or text.strip()


@click.command()
@click.option("--dir", "base", type=click.Path(path_type=Path), default=CHECKOUT / "demo-var",
              show_default=True, help="Folder for the demo's var/ and configs (wiped first).")
@click.option("--posts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Messages to post through the pipe.")
@click.option("--keep", is_flag=True, help="Leave the masters running and the folder in place.")
def main(base: Path, posts: int, keep: bool) -> None:
    """Run a two-node local cluster that delivers real mail to a local SMTP sink.

    Exit status 0 when every enabled member got every post exactly once and both masters
    stopped cleanly; 1 otherwise (what went wrong is printed).

    \b
    Example:
      python3 dev.py demo --posts 5
    """
    demo = Demo(base.resolve(), posts)
    started = time.time()
    ok = stopped = False
    try:
        demo.setup()
        demo.start()
        sent = demo.post()
        got = demo.wait(sent)
        ok = demo.report(sent, got)
    finally:
        stopped = keep or demo.stop()
    verdict = "every enabled member got every post exactly once" if ok else "SOME MAIL IS MISSING OR DOUBLED"
    if not stopped:
        verdict += "; A MASTER DID NOT STOP (see above)"
    click.echo(f"done in {time.time() - started:.1f} s: {verdict}")
    sys.exit(0 if ok and stopped else 1)


if __name__ == "__main__":
    main()
