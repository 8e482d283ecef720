"""Benchmark building a digest of 1,000 pending posts, in both formats, against parsing them.

    python bench/digest.py [--posts 1000] [--rounds 5]

The posts are one third plain text, one third HTML-only (with a multipart/alternative half of
them) and one third multipart/mixed with a PDF attachment, each a few kilobytes, written to a real
pending digest (``digest.mbox``, mboxrd) of a real list in a temp var.  Measured, each the median
of ``--rounds`` runs in this one process:

* ``parse_ms``: ``email.message_from_bytes`` (compat32) of the same 1,000 messages: what building
  a digest cannot beat, since every digest must at least read each post.  The parse and the
  builds take turns within each round, so a load that comes and goes hits them alike;
* ``build_ms_mime`` / ``build_ms_plain``: ``mailq.digest.build`` for one format, from the raw posts
  to the finished message bytes (table of contents, header, footer, parts or text), as ``send``
  does it: the plain build reads the HTML parts' text that ``append_pending`` converted when the
  posts were appended (``digest.texts``, for a list with plain readers) and converts the rest;
* ``build_ms_plain_unconverted``: the plain build of posts appended without that (a list that had
  no plain reader then): every HTML part converted while building;
* ``append_ms`` / ``append_convert_ms``: ``append_pending`` of the 1,000 posts without and with
  that conversion (fsync off): the cost the conversion moved from the build to the archive runner;
* ``send_ms``: ``mailq.digest.send`` with both formats' members: read the pending file, build both,
  stage, queue into ``out`` (fsync off, so the disk does not decide it);
* ``ratio_vs_parse`` = the slower build / parse_ms (target <= 3), plus each format's ratio.

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import email
import json
import shutil
import statistics
import sys
import tempfile
import time
from email import policy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARAGRAPH = ("The quarterly numbers are in, and the build farm is finally keeping up with the load. "
             "Please read the notes below before Thursday's meeting.\n")


def make_post(i: int) -> bytes:
    """Post *i*: plain, HTML (alternative or HTML-only) or with an attachment, by i % 3."""
    head = (f"From: Member {i} <member{i}@example.net>\nTo: dev@example.org\nSubject: topic {i}: build notes\n"
            f"Date: Fri, 15 Jan 2027 12:{i % 60:02d}:00 +0000\nMessage-ID: <bench-{i}@example.net>\n"
            "MIME-Version: 1.0\n")
    text = PARAGRAPH * (8 + i % 7)
    kind = i % 3
    if kind == 0:
        return (head + "Content-Type: text/plain; charset=utf-8\n\n" + text).encode()
    html = "<html><body>" + "".join(f"<p>{line} <b>bold</b> <a href='https://example.org/{i}'>link</a></p>"
                                    for line in text.splitlines()) + "</body></html>\n"
    if kind == 1:
        if i % 2:
            return (head + "Content-Type: text/html; charset=utf-8\n\n" + html).encode()
        return (head + f'Content-Type: multipart/alternative; boundary="alt{i}"\n\n--alt{i}\n'
                f"Content-Type: text/plain; charset=utf-8\n\n{text}--alt{i}\nContent-Type: text/html; charset=utf-8\n\n"
                f"{html}--alt{i}--\n").encode()
    pdf = ("JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFIvRmlsdGVyIC9GbGF0ZURlY29kZT4+\n" * 40)
    return (head + f'Content-Type: multipart/mixed; boundary="mix{i}"\n\n--mix{i}\n'
            f"Content-Type: text/plain; charset=utf-8\n\n{text}--mix{i}\n"
            f'Content-Type: application/pdf; name="report-{i}.pdf"\nContent-Disposition: attachment; '
            f'filename="report-{i}.pdf"\nContent-Transfer-Encoding: base64\n\n{pdf}--mix{i}--\n').encode()


def interleaved(funcs: dict, rounds: int) -> dict[str, float]:
    """Median ms of each function, the functions taking turns in every round: on a loaded machine
    the load of any moment then falls on all of them alike, and their ratios stay fair."""
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(rounds):
        for name, func in funcs.items():
            start = time.perf_counter()
            func()
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from mailq.config import Settings
    from mailq.digest import TEXTS_NAME, append_pending, build, converted_texts, pending_path, send
    from mailq.lists import ListStore, Member

    tmp = Path(tempfile.mkdtemp(prefix="mailq-bench-digest-"))
    try:
        settings = Settings()
        settings.paths.var = tmp / "var"
        settings.node.name = f"bench-{tmp.name[-8:]}"
        settings.queue.fsync = False
        store = ListStore(settings)
        store.create("dev", "owner@example.org", "example.org", digest_size_kb=0)
        with store.edit("dev") as mlist:
            mlist.members.add_many([Member(f"m{i}@example.net", digest="mime" if i % 2 else "plain")
                                    for i in range(100)])
        mlist = store.load("dev")
        posts = [make_post(i) for i in range(args.posts)]
        total = sum(len(p) for p in posts)
        when = time.time()

        items = [(p, "poster@example.net", when) for p in posts]
        pending, texts = pending_path(settings, "dev"), pending_path(settings, "dev").with_name(TEXTS_NAME)

        def append(convert: bool) -> None:
            pending.unlink(missing_ok=True)
            texts.unlink(missing_ok=True)
            append_pending(settings, "dev", items, convert_html=convert)

        # converting last in each round, so its digest.texts is there for the builds
        appended = interleaved({"plain": lambda: append(False), "convert": lambda: append(True)}, args.rounds)
        append_ms, append_convert_ms = appended["plain"], appended["convert"]
        sizes = {}

        def build_one(fmt: str, converted: bool = True) -> None:
            done = converted_texts(texts) if fmt == "plain" and converted else None
            sizes[fmt] = len(build(mlist, posts, 1, 1, when, [fmt], converted=done)[fmt])

        timed = interleaved({
            "parse": lambda: [email.message_from_bytes(p, policy=policy.compat32) for p in posts],
            "mime": lambda: build_one("mime"),
            "plain": lambda: build_one("plain"),
            "unconverted": lambda: build_one("plain", converted=False),
        }, args.rounds)
        parse_ms, mime_ms, plain_ms, unconverted_ms = (timed[k] for k in ("parse", "mime", "plain", "unconverted"))
        pending.unlink()
        texts.unlink()
        send_samples = []
        for _ in range(args.rounds):
            append_pending(settings, "dev", items, convert_html=True)
            start = time.perf_counter()
            report = send(settings, "dev", force=True, store=store)
            send_samples.append((time.perf_counter() - start) * 1000)
            assert report.sent and report.sent[-1].posts == args.posts, report.summary()
        send_ms = statistics.median(send_samples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = {
        "posts": args.posts, "pending_mb": round(total / 1048576, 2), "rounds": args.rounds,
        "parse_ms": round(parse_ms, 1), "build_ms_mime": round(mime_ms, 1), "build_ms_plain": round(plain_ms, 1),
        "build_ms_plain_unconverted": round(unconverted_ms, 1), "send_ms": round(send_ms, 1),
        "append_ms": round(append_ms, 1), "append_convert_ms": round(append_convert_ms, 1),
        "ratio_plain_unconverted_vs_parse": round(unconverted_ms / parse_ms, 2),
        "ratio_mime_vs_parse": round(mime_ms / parse_ms, 2), "ratio_plain_vs_parse": round(plain_ms / parse_ms, 2),
        "ratio_vs_parse": round(max(mime_ms, plain_ms) / parse_ms, 2), "target_ratio": 3,
        "digest_kb_mime": round(sizes["mime"] / 1024), "digest_kb_plain": round(sizes["plain"] / 1024),
    }
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:{width}}  {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
