"""Helpers (no tests) for the bounce tests: the shared corpus, DSNs as a real MTA writes them, lists."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support import ROOT


def corpus_dir() -> Path | None:
    """``../shared/bounces`` from the checkout root (CI's sibling checkout), else from a worktree's parent."""
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "bounces"
        if (path / "manifest.json").is_file():
            return path
    return None


def manifest() -> list[dict[str, Any]]:
    folder = corpus_dir()
    assert folder is not None
    return json.loads((folder / "manifest.json").read_text())


def dsn(recipient: str, *, status: str = "5.1.1", msgid: str, reporter: str = "mx.example.net") -> bytes:
    """An RFC 3464 delivery status notification as Postfix writes one (failed, or delayed for 4.x.x)."""
    action = "failed" if status.startswith("5") else "delayed"
    subject = "Undelivered Mail Returned to Sender" if action == "failed" else "Delayed Mail (still being retried)"
    text = f"""From: MAILER-DAEMON@{reporter} (Mail Delivery System)
To: dev-bounces@example.org
Subject: {subject}
Message-ID: {msgid}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUNDARY"

--BOUNDARY
Content-Type: text/plain

This is the mail system at host {reporter}.

<{recipient}>: host {reporter} said: {status} mailbox trouble

--BOUNDARY
Content-Type: message/delivery-status

Reporting-MTA: dns; {reporter}

Final-Recipient: rfc822; {recipient}
Original-Recipient: rfc822;{recipient}
Action: {action}
Status: {status}
Diagnostic-Code: smtp; 550 {status} mailbox trouble

--BOUNDARY
Content-Type: text/rfc822-headers

From: dev@example.org
Subject: a post

--BOUNDARY--
"""
    return text.replace("\n", "\r\n").encode()


def bounce_list(settings: Any, members: list[str], name: str = "dev", **overrides: Any) -> None:
    from mailq.lists import ListStore
    from mailq.lists.members import Member

    store = ListStore(settings)
    store.create(name, "owner@example.org", domain="example.org", **overrides)
    with store.edit(name) as mlist:
        mlist.members.add_many([Member(a) for a in members])


def member(settings: Any, address: str, name: str = "dev") -> Any:
    from mailq.lists import ListStore

    return ListStore(settings).load(name).members.get(address)


def queue_files(var: Path, queue: str) -> list[Path]:
    return sorted((var / "qfiles" / queue).glob("*/*.pck*"))


def virgin_notices(settings: Any) -> list[tuple[list[str], str, bytes]]:
    """(recipients, subject, raw) of every waiting notice in ``virgin``."""
    import email

    from mailq.queue import Queue

    q = Queue.for_settings(settings, "virgin")
    out = []
    for path in sorted((settings.qfiles / "virgin").glob("*/*.pck")):
        msg, meta = q.read(path)
        out.append((list(meta["recipients"]), str(email.message_from_bytes(msg)["subject"]), msg))
    return out


