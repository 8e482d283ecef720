"""DMARC: policy discovery against a real DNS responder on loopback, the shared cache, the stage.

Every lookup is a real dnspython query to ``mailq.loopdns.LoopDNS`` on 127.0.0.1; the copies of
posts are checked header by header at a real SMTP sink after real ``in`` and ``out`` runner
processes handled them.
"""
from __future__ import annotations

import email
import json
import logging
import multiprocessing
import os
from email import policy

import pytest

from mailq.dmarc import DmarcCache, organizational_domain
from mailq.loopdns import LoopDNS
from mailq.pipeline.base import to_bytes
from tests.pipeline_support import make_list, queue_entries, run_pipeline
from tests.support import make_node

ZONE = {
    ("_dmarc.reject.test", "TXT"): ["v=DMARC1; p=reject; rua=mailto:d@reject.test"],
    ("_dmarc.quarantine.test", "TXT"): ["v=DMARC1; p=quarantine; pct=100"],
    ("_dmarc.none.test", "TXT"): ["v=DMARC1; p=none"],
    # the organizational domain's record: sp= applies to its subdomains
    ("_dmarc.example.co.uk", "TXT"): ["v=DMARC1; p=none; sp=reject"],
    ("_dmarc.two.test", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    ("_dmarc.notdmarc.test", "TXT"): ["v=spf1 -all"],
    ("_dmarc.split.test", "TXT"): ['"v=DMARC1; " "p=quarantine"'],   # one record in two strings
}
SERVFAIL = ["_dmarc.servfail.test"]
SILENT = ["_dmarc.silent.test"]


@pytest.fixture
def dns_server():
    with LoopDNS(ZONE, ttl=600, negative_ttl=900, servfail=SERVFAIL, silent=SILENT) as server:
        yield server


def dns_node(tmp_path, server, name="n1", dns=None, **extra):
    """A node whose lookups go to *server* (timeout 1 s), with *dns* settings added."""
    return make_node(tmp_path, name, var=tmp_path / "var",
                     dns={"nameservers": ["127.0.0.1"], "port": server.port, "timeout": 1, **(dns or {})},
                     **extra)


# -- discovery --------------------------------------------------------------------------------------

def test_policies_are_found_at_the_domain_then_the_organizational_domain(tmp_path, dns_server):
    cache = DmarcCache(dns_node(tmp_path, dns_server).settings())
    assert cache.policy("reject.test").policy == "reject"
    assert cache.policy("QUARANTINE.test.").policy == "quarantine"
    assert cache.policy("none.test").policy == "none"
    assert cache.policy("split.test").policy == "quarantine"
    nothing = cache.policy("norecord.test")
    assert nothing.policy == "" and not nothing.failed and "no DMARC record" in nothing.why
    # mail.example.co.uk has no record; the PSL says its organizational domain is example.co.uk
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    sub = cache.policy("mail.example.co.uk")
    assert (sub.policy, sub.source) == ("reject", "_dmarc.example.co.uk")
    assert dns_server.count("_dmarc.mail.example.co.uk") == 1 and dns_server.count("_dmarc.example.co.uk") == 1
    # the organizational domain itself gets p=, not sp=
    assert cache.policy("example.co.uk").policy == "none"
    two = cache.policy("two.test")
    assert two.policy == "" and "2 DMARC records" in two.why
    assert cache.policy("notdmarc.test").policy == ""      # a TXT record that is not DMARC
    assert cache.policy("bad name/../x").policy == ""      # never asked, never a file name
    assert not any("/" in name for name, _ in dns_server.queries)


def test_answers_are_cached_on_the_shared_tree_for_every_host(tmp_path, dns_server):
    hosts = [dns_node(tmp_path, dns_server, name) for name in ("n1", "n2", "n3")]
    for _ in range(100):
        for host in hosts:
            assert DmarcCache(host.settings()).policy("reject.test").policy == "reject"
            assert DmarcCache(host.settings()).policy("norecord.test").policy == ""
    assert dns_server.count("_dmarc.reject.test") == 1
    assert dns_server.count("_dmarc.norecord.test") == 1 and dns_server.count("_dmarc.norecord.test") == 1
    settings = hosts[1].settings()
    cache = DmarcCache(settings)
    positive = json.loads(cache.path("_dmarc.reject.test").read_text())
    negative = json.loads(cache.path("_dmarc.norecord.test").read_text())
    assert positive["state"] == "record" and positive["records"] == ZONE[("_dmarc.reject.test", "TXT")]
    assert round(positive["expires"] - positive["at"]) == 600                 # the record's TTL
    assert negative["state"] == "none" and round(negative["expires"] - negative["at"]) == 900  # SOA minimum
    assert positive["node"] == "n1"


def test_ttls_are_clamped_and_an_expired_answer_is_asked_again(tmp_path):
    with LoopDNS(ZONE, ttl=5, negative_ttl=10 ** 6) as server:
        node = dns_node(tmp_path, server, dns={"cache_min_ttl": 60, "cache_max_ttl": 3600})
        cache = DmarcCache(node.settings())
        cache.policy("reject.test")
        cache.policy("norecord.test")
        low = json.loads(cache.path("_dmarc.reject.test").read_text())
        high = json.loads(cache.path("_dmarc.norecord.test").read_text())
        assert round(low["expires"] - low["at"]) == 60 and round(high["expires"] - high["at"]) == 3600
        low["expires"] = low["at"] - 1                # what the passing of its TTL does
        cache.path("_dmarc.reject.test").write_text(json.dumps(low))
        assert cache.policy("reject.test").policy == "reject"
        assert server.count("_dmarc.reject.test") == 2


def test_servfail_and_timeout_mean_no_policy_after_the_timeout_logged_and_cached(tmp_path, dns_server, caplog):
    cache = DmarcCache(dns_node(tmp_path, dns_server).settings())
    with caplog.at_level(logging.WARNING, logger="mailq.dmarc"):
        failed = cache.policy("servfail.test")
        silent = cache.policy("silent.test")
    assert failed.policy == "" and failed.failed and "SERVFAIL" in failed.why
    assert silent.policy == "" and silent.failed and "imeout" in silent.why
    # SERVFAIL was asked again until the timeout, not given up on at the first answer
    assert dns_server.count("_dmarc.servfail.test") > 1
    assert sum("treated as no DMARC policy" in r.getMessage() for r in caplog.records) == 2
    asked = dns_server.count("_dmarc.servfail.test")
    assert cache.policy("servfail.test").failed and dns_server.count("_dmarc.servfail.test") == asked
    assert json.loads(cache.path("_dmarc.silent.test").read_text())["state"] == "failure"


def test_the_cache_is_capped(tmp_path, dns_server):
    node = dns_node(tmp_path, dns_server, dns={"cache_max_entries": 256})
    cache = DmarcCache(node.settings())
    for i in range(600):
        cache.policy(f"d{i}.test")
    files = [p for p in cache.folder.glob("*/*") if not p.name.startswith(".")]
    assert len(files) <= 256 and all(len(list(b.iterdir())) == 1 for b in cache.folder.iterdir())


def _hammer(folder: str, rounds: int, seed: int) -> None:
    """Another host writing the same cache file again and again (a separate process)."""
    from mailq.config import Settings
    from mailq.dmarc import DmarcCache

    settings = Settings()
    settings.paths.var = __import__("pathlib").Path(folder)
    settings.node.name = f"h{seed}"
    cache = DmarcCache(settings)
    path = cache.path("_dmarc.busy.test")
    for i in range(rounds):
        entry = {"v": 1, "name": "_dmarc.busy.test", "state": "record", "node": settings.node.name,
                 "records": [f"v=DMARC1; p=reject; x={seed}-{i}" + "y" * (i % 97)], "at": 0.0, "expires": 1e12}
        cache._store(path, entry)  # noqa: SLF001 - the write path, without DNS


def test_concurrent_writers_from_several_processes_never_leave_a_torn_file(tmp_path):
    from mailq.config import Settings

    var = tmp_path / "var"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_hammer, args=(str(var), 300, n)) for n in range(4)]
    for w in workers:
        w.start()
    settings = Settings()
    settings.paths.var = var
    path = DmarcCache(settings).path("_dmarc.busy.test")
    reads = 0
    while any(w.is_alive() for w in workers) or reads == 0:
        if path.exists():
            data = DmarcCache.read(path, "_dmarc.busy.test")
            assert data is not None and data["records"][0].startswith("v=DMARC1; p=reject; x=")
            reads += 1
    for w in workers:
        w.join()
        assert w.exitcode == 0
    assert not [n for n in os.listdir(path.parent) if n.startswith(".")]    # no temp file left


# -- the stage, in process ------------------------------------------------------------------------

def post(sender: str, subject: str = "Hello", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: dev@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{abs(hash(sender + subject))}@x.test>\r\n{extra}\r\nBody text.\r\n").encode()


@pytest.fixture
def dnode(tmp_path, dns_server):
    return dns_node(tmp_path, dns_server)


def test_munge_from_with_encoded_names_several_addresses_and_reply_to_policies(dnode):
    settings = dnode.settings()
    mlist = make_list(settings, display_name="Dev Team")
    msg, data, stop = run_pipeline(settings, mlist, post("=?utf-8?q?J=C3=BCrgen?= <j@reject.test>"),
                                   ["sanity", "dmarc"])
    assert stop is None and data["dmarc"]["action"] == "munge_from"
    seen = email.message_from_bytes(to_bytes(msg), policy=policy.default)
    assert str(seen["From"]) == "Jürgen via Dev Team <dev@example.org>"
    assert seen["From"].addresses[0].addr_spec == "dev@example.org"
    assert str(seen["Reply-To"]) == "Jürgen <j@reject.test>"
    # several From: addresses, one strict domain: all of them become the reply address
    msg, data, _ = run_pipeline(settings, mlist, post("a@none.test, B <b@quarantine.test>"), ["sanity", "dmarc"])
    seen = email.message_from_bytes(to_bytes(msg), policy=policy.default)
    assert str(seen["From"]) == "\"a@none.test, B via Dev Team\" <dev@example.org>"
    assert [a.addr_spec for a in seen["Reply-To"].addresses] == ["a@none.test", "b@quarantine.test"]
    # a post with its own Reply-To keeps it
    msg, _, _ = run_pipeline(settings, mlist, post("c@reject.test", extra="Reply-To: elsewhere@x.test\r\n"),
                             ["sanity", "dmarc"])
    assert msg.get_all("reply-to") == ["elsewhere@x.test"]
    # reply_to: list -> the poster goes into Cc, and list_headers points Reply-To at the list
    mlist = make_list(settings, "team", reply_to="list")
    msg, _, _ = run_pipeline(settings, mlist, post("d@reject.test").replace(b"dev@", b"team@"),
                             ["sanity", "dmarc", "list_headers"])
    assert msg["cc"] == "d@reject.test" and msg["reply-to"] == "team@example.org"


def test_policies_that_do_not_ask_for_mitigation_leave_from_alone(dnode):
    settings = dnode.settings()
    mlist = make_list(settings)
    for sender in ("a@none.test", "b@norecord.test", "c@servfail.test", "d@two.test"):
        raw = post(sender)
        msg, data, stop = run_pipeline(settings, mlist, raw, ["sanity", "dmarc"])
        assert stop is None and msg["from"] == sender and to_bytes(msg) == raw, sender
        assert data["dmarc"]["action"] == "none"
    # no From: at all (the sender came from the envelope): nothing to mitigate, nothing raised
    raw = b"To: dev@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    msg, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "dmarc"], envelope_sender="e@reject.test")
    assert stop is None and to_bytes(msg) == raw


def test_unconditional_reject_discard_and_no_mitigation(dnode):
    settings = dnode.settings()
    mlist = make_list(settings, dmarc_mitigate_unconditionally=True)
    msg, _, _ = run_pipeline(settings, mlist, post("a@none.test"), ["sanity", "dmarc"])
    assert msg["from"] == '"a@none.test via dev" <dev@example.org>'
    mlist = make_list(settings, "rej", dmarc_mitigate_action="reject", dmarc_mitigate_unconditionally=True)
    _, _, stop = run_pipeline(settings, mlist, post("a@none.test"), ["sanity", "dmarc"])
    assert stop is None         # reject needs a strict policy, unconditional or not
    _, _, stop = run_pipeline(settings, mlist, post("a@reject.test"), ["sanity", "dmarc"])
    assert stop.action == "reject" and "p=reject" in stop.reason
    mlist = make_list(settings, "rej2", dmarc_mitigate_action="reject",
                      dmarc_moderation_notice="Post from another address, please.")
    _, _, stop = run_pipeline(settings, mlist, post("a@quarantine.test"), ["sanity", "dmarc"])
    assert stop.reason == "Post from another address, please."
    mlist = make_list(settings, "dis", dmarc_mitigate_action="discard")
    _, _, stop = run_pipeline(settings, mlist, post("a@mail.example.co.uk"), ["sanity", "dmarc"])
    assert stop.action == "discard"
    mlist = make_list(settings, "off", dmarc_mitigate_action="no_mitigation")
    raw = post("a@reject.test")
    msg, _, stop = run_pipeline(settings, mlist, raw, ["sanity", "dmarc"])
    assert stop is None and to_bytes(msg) == raw


def test_wrap_message_keeps_the_original_byte_for_byte_and_moves_a_password_out(dnode):
    settings = dnode.settings()
    mlist = make_list(settings, dmarc_mitigate_action="wrap_message")
    raw = post("Ann <ann@reject.test>", extra="DKIM-Signature: v=1; d=reject.test; b=abc\r\n"
                                             "Approved: s3cret\r\nIn-Reply-To: <p@x.test>\r\n")
    msg, data, stop = run_pipeline(settings, mlist, raw)     # the whole default pipeline
    assert stop is None and data["approved"] is True        # the password still approves
    out = queue_entries(settings, "out")[-1][0]
    seen = email.message_from_bytes(out, policy=policy.default)
    assert str(seen["From"]) == "Ann via dev <dev@example.org>" and str(seen["Reply-To"]) == "Ann <ann@reject.test>"
    assert seen["Subject"] == "[dev] Hello" and seen["In-Reply-To"] == "<p@x.test>"
    assert seen.get_content_type() == "multipart/mixed" and "approved" not in out.decode().lower()
    wrapped, footer = seen.get_payload()
    assert wrapped.get_content_type() == "message/rfc822"
    inner = wrapped.get_payload()[0]
    assert inner["DKIM-Signature"] == "v=1; d=reject.test; b=abc" and str(inner["From"]) == "Ann <ann@reject.test>"
    assert inner.get_content().strip() == "Body text." and "leave" in footer.get_content()


# -- end to end: real runners, real sink ----------------------------------------------------------

def test_copies_at_the_sink_header_by_header(tmp_path, dns_server, sink):
    node = dns_node(tmp_path, dns_server, smtp={"port": sink.port})
    settings = node.settings()
    make_list(settings, display_name="Dev", nonmember_action="accept", footer="")
    senders = {"reject": "Rita <rita@reject.test>", "quarantine": "=?iso-8859-1?q?Qu=E9?= <q@quarantine.test>",
               "none": "Nora <nora@none.test>", "norecord": "nobody@norecord.test",
               "org": "Olga <olga@mail.example.co.uk>", "servfail": "sf@servfail.test",
               "timeout": "tm@silent.test"}
    for tag, sender in senders.items():
        node.run("mailq-deliver", "post", "dev", input=post(sender, subject=tag), check=True)
    node.run("qrunner", "-r", "in", "--once", check=True)
    node.run("qrunner", "-r", "out", "--once", check=True)
    copies = {}
    for received in sink.messages:
        seen = email.message_from_bytes(received.data, policy=policy.default)
        copies[str(seen["Subject"]).removeprefix("[dev] ")] = seen
    assert sorted(copies) == sorted(senders)
    munged = {"reject": ("Rita via Dev <dev@example.org>", "Rita <rita@reject.test>"),
              "quarantine": ("Qué via Dev <dev@example.org>", "Qué <q@quarantine.test>"),
              "org": ("Olga via Dev <dev@example.org>", "Olga <olga@mail.example.co.uk>")}
    for tag, seen in copies.items():
        if tag in munged:
            assert (str(seen["From"]), str(seen["Reply-To"])) == munged[tag], tag
        else:
            original = email.message_from_bytes(post(senders[tag]), policy=policy.default)
            assert str(seen["From"]) == str(original["From"]) and seen["Reply-To"] is None, tag
        assert seen["To"] == "dev@example.org" and seen["List-Id"] == '"Dev" <dev.example.org>'
        assert seen["X-BeenThere"] == "dev@example.org" and seen["Precedence"] == "list"
        assert seen["Message-ID"] == f"<{abs(hash(senders[tag] + tag))}@x.test>"
        assert seen.get_content().strip() == "Body text."
    # one lookup per name for all seven posts; the failures are in in.log with their domain
    log = (settings.log_dir / "in.log").read_text()
    assert "_dmarc.servfail.test failed" in log and "_dmarc.silent.test failed" in log
    assert dns_server.count("_dmarc.reject.test") == 1


def test_the_dns_section_is_validated_and_builds_the_one_resolver(tmp_path):
    from mailq.config import ConfigError, parse_settings
    from mailq.resolver import make_resolver

    with pytest.raises(ConfigError, match=r"<config>:2: dns.nameservers: expected a list of IP addresses"):
        parse_settings("dns:\n  nameservers: [resolver.example.org]\n")
    with pytest.raises(ConfigError, match=r"dns.timeout: expected a number > 0"):
        parse_settings("dns: {timeout: 0}\n")
    settings = parse_settings("dns: {nameservers: ['::1', 127.0.0.53], port: 5353, timeout: 2.5}\n")
    resolver = make_resolver(settings)
    assert (resolver.nameservers, resolver.port, resolver.lifetime) == (["::1", "127.0.0.53"], 5353, 2.5)


def test_in_runners_of_two_hosts_share_one_lookup(tmp_path, dns_server):
    """Posts from one domain handled by the in runners of two nodes (real processes, one var): one query."""
    n1, n2 = dns_node(tmp_path, dns_server, "n1"), dns_node(tmp_path, dns_server, "n2")
    settings = n1.settings()
    make_list(settings, nonmember_action="accept")
    for node, batch in ((n1, "a"), (n2, "b")):
        for i in range(10):
            node.run("mailq-deliver", "post", "dev", input=post(f"p{i}@reject.test", subject=f"{batch}{i}"),
                     check=True)
        node.run("qrunner", "-r", "in", "--once", check=True)
    outs = [email.message_from_bytes(m, policy=policy.default) for m, _ in queue_entries(settings, "out")]
    assert len(outs) == 20
    assert {(m["From"].addresses[0].display_name.endswith("@reject.test via dev"), m["From"].addresses[0].addr_spec)
            for m in outs} == {(True, "dev@example.org")}
    assert dns_server.count("_dmarc.reject.test") == 1
    assert "dmarc: munge_from" in (settings.var / "log" / "n2" / "in.log").read_text()


def test_mailqctl_dmarc_shows_policies_from_the_cache_or_dns(tmp_path, dns_server):
    node = dns_node(tmp_path, dns_server)
    shown = node.run("mailqctl", "dmarc", "reject.test", "mail.example.co.uk", "norecord.test", "--json")
    assert shown.returncode == 0, shown.stderr
    by = {r["domain"]: r for r in json.loads(shown.stdout)}
    assert (by["reject.test"]["policy"], by["reject.test"]["record"]) == \
        ("reject", ZONE[("_dmarc.reject.test", "TXT")][0])
    sub = by["mail.example.co.uk"]
    assert (sub["policy"], sub["source"]) == ("reject", "_dmarc.example.co.uk")
    assert [a["state"] for a in sub["answers"]] == ["none", "record"]
    assert by["norecord.test"]["policy"] == "none published" and not by["norecord.test"]["strict"]
    again = node.run("mailqctl", "dmarc", "reject.test")          # from the cache: no new query
    assert again.returncode == 0 and "reject" in again.stdout and "CACHED UNTIL" in again.stdout
    assert dns_server.count("_dmarc.reject.test") == 1
    assert node.run("mailqctl", "dmarc", "--refresh", "reject.test").returncode == 0
    assert dns_server.count("_dmarc.reject.test") == 2
    failed = node.run("mailqctl", "dmarc", "silent.test", "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)[0]["dns_failed"] is True
    assert "mailqctl dmarc gmail.com" in node.run("mailqctl", "dmarc", "--help").stdout
