"""The list database: save protocol, fallback to .last, validation, crash safety."""
from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailq import safepickle
from mailq.errors import InvalidInput, NotFound
from mailq.lists import STATUSES, ListSettings, ListStore, Member, Roster, validate_list_name
from tests.support import ROOT


@pytest.fixture
def store(settings):
    s = ListStore(settings)
    s.create("dev", "Owner@Example.org", domain="example.org")
    return s


def test_create_edit_load_bumps_generation_and_keeps_last(store):
    assert store.exists("dev") and store.names() == ["dev"]
    path = store.db_path("dev")
    assert path == store.settings.lists_dir / "dev" / "list.pck"
    first = path.read_bytes()
    with store.edit("dev") as mlist:
        mlist.members.add("Alice@Example.org", display_name="Alice")
    mlist = store.load("dev")
    assert mlist.generation == 2 and not mlist.loaded_from_last
    assert path.with_name("list.pck.last").read_bytes() == first
    assert [m.address for m in mlist.members] == ["Alice@Example.org"]


def test_role_addresses_and_list_id(store):
    mlist = store.load("dev")
    assert (mlist.posting_address, mlist.owner_address, mlist.request_address, mlist.bounces_address,
            mlist.join_address, mlist.leave_address, mlist.confirm_address, mlist.list_id) == (
        "dev@example.org", "dev-owner@example.org", "dev-request@example.org", "dev-bounces@example.org",
        "dev-join@example.org", "dev-leave@example.org", "dev-confirm@example.org", "dev.example.org")
    assert mlist.is_owner("owner@example.org") and mlist.is_moderator("OWNER@example.org")
    assert not mlist.is_owner("someone@example.org")


def test_members_match_case_insensitively_and_recipients_follow_status_and_digest(store):
    with store.edit("dev") as mlist:
        mlist.members.add("Alice@Example.org")
        mlist.members.add(Member("bob@example.org", digest=True))
        mlist.members.add("carol@example.org")
        with pytest.raises(InvalidInput, match="already a member"):
            mlist.members.add("ALICE@example.org")
    with store.edit("dev") as mlist:
        mlist.members.get("CAROL@EXAMPLE.ORG").status = "disabled_bounce"
        mlist.members.get("alice@example.org").bounce_score = 1.5
    mlist = store.load("dev")
    assert mlist.regular_recipients() == ["Alice@Example.org"]
    assert mlist.digest_recipients() == ["bob@example.org"]
    carol = mlist.members.get("carol@example.org")
    assert carol.status == "disabled_bounce" and carol.disabled_at is not None
    assert mlist.members.get("alice@EXAMPLE.org").bounce_score == 1.5
    assert "BOB@example.org" in mlist.members and len(mlist.members) == 3
    with store.edit("dev") as mlist:
        mlist.members.remove("Bob@Example.Org")
    assert store.load("dev").digest_recipients() == []


def test_corrupt_current_file_falls_back_to_last_says_so_and_next_save_keeps_last(store, caplog):
    with store.edit("dev") as mlist:
        mlist.members.add("alice@example.org")
    path = store.db_path("dev")
    good_last = path.with_name("list.pck.last").read_bytes()
    path.write_bytes(path.read_bytes()[:100])  # a torn write
    mlist = store.load("dev")
    assert mlist.loaded_from_last and "unreadable" in mlist.load_problem and "list.pck.last" in mlist.load_problem
    assert mlist.generation == 1 and len(mlist.members) == 0
    assert any("unreadable" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    with store.edit("dev") as mlist:
        mlist.members.add("bob@example.org")
    assert path.with_name("list.pck.last").read_bytes() == good_last
    assert [p.name for p in path.parent.glob("list.pck.corrupt.*")]
    fresh = store.load("dev")
    assert not fresh.loaded_from_last and [m.address for m in fresh.members] == ["bob@example.org"]


def test_hostile_pickle_never_runs_code(store, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    with store.edit("dev") as mlist:
        mlist.settings.description = "changed"  # a save: now there is a .last to fall back to
    store.db_path("dev").write_bytes(pickle.dumps({"format": 1, "x": Evil()}))
    mlist = store.load("dev")
    assert mlist.loaded_from_last and "forbidden" in mlist.load_problem
    assert not marker.exists()


def test_an_edit_that_changes_nothing_writes_nothing(store):
    with store.edit("dev") as mlist:
        mlist.members.add_many(Member(f"m{i}@example.org", digest=i == 1) for i in range(3))
    path = store.db_path("dev")
    last = path.with_name("list.pck.last")

    def state():
        return path.read_bytes(), last.read_bytes(), os.stat(path).st_ino, os.stat(last).st_ino

    before = state()
    no_ops = [
        lambda m: None,
        lambda m: m.members.add_many([Member("M0@example.org")]),       # already a member
        lambda m: m.members.remove_many(["nobody@example.org"]),        # not a member
        lambda m: setattr(m.members.get("m1@example.org"), "digest", True),  # already digest
        lambda m: m.settings.set_text("nonmember_action", m.settings.nonmember_action),
        lambda m: [setattr(x, "moderated", x.moderated) for x in m.members],  # every row, unchanged
    ]
    for change in no_ops:
        with store.edit("dev") as mlist:
            change(mlist)
        assert not mlist.saved and mlist.generation == 2
        assert state() == before
    with store.edit("dev") as mlist:
        mlist.members.get("m2@example.org").bounce_score = 1.0
    assert mlist.saved and store.load("dev").generation == 3
    assert last.read_bytes() == before[0]
    with store.edit("dev", always_save=True) as mlist:  # what 'mailqctl check --fix' uses
        pass
    assert mlist.saved and store.load("dev").generation == 4


def test_load_returns_the_cached_list_until_the_file_changes(store, settings):
    first = store.load("dev")
    assert store.load("dev") is first  # one open and fstat, no unpickling
    other = ListStore(settings)  # another process or host, as far as this store knows
    with other.edit("dev") as mlist:
        mlist.members.add("alice@example.org")
    fresh = store.load("dev")
    assert fresh is not first and fresh.generation == 2 and "alice@example.org" in fresh.members
    with store.edit("dev") as editing:
        assert editing is not fresh  # an edit always reads afresh: it may change what it gets
        editing.members.add("bob@example.org")
    assert store.load("dev").generation == 3
    store.db_path("dev").write_bytes(b"\x80\x05garbage")
    fallback = store.load("dev")
    assert fallback.loaded_from_last and store.load("dev") is not fallback  # a fallback is never cached


def test_an_edit_walks_the_pickle_only_when_another_writer_changed_list_pck(store, settings, monkeypatch):
    """``edit`` reloads under the lock every time; bytes this store wrote or checked, still on disk
    unchanged, are unpickled without the safety walk again (docs/bounces.md §3, a batch per edit)."""
    walks = []
    real_check = safepickle.check
    monkeypatch.setattr(safepickle, "check", lambda data, **kw: (walks.append(len(data)), real_check(data, **kw)))
    with store.edit("dev") as mlist:           # list.pck written by create(): this store's own bytes
        mlist.members.add("alice@example.org")
    with store.edit("dev") as mlist:
        assert "alice@example.org" in mlist.members
        mlist.members.get("alice@example.org").bounce_score = 1.0
    assert walks == []
    other = ListStore(settings)               # another process or host
    with other.edit("dev") as mlist:           # walks what it never saw
        mlist.members.add("bob@example.org")
    assert len(walks) == 1
    with store.edit("dev") as mlist:           # the file changed: read and walked afresh
        assert "bob@example.org" in mlist.members and mlist.members.get("alice@example.org").bounce_score == 1.0
        mlist.members.add("carol@example.org")
    assert len(walks) == 2
    # A block that raises leaves nothing behind: the next edit builds the list from the bytes again.
    with pytest.raises(RuntimeError), store.edit("dev") as mlist:
        mlist.members.remove_many(["alice@example.org"])
        raise RuntimeError("changed my mind")
    with store.edit("dev") as mlist:
        assert {"alice@example.org", "bob@example.org", "carol@example.org"} <= {m.address for m in mlist.members}
    assert len(walks) == 2
    # Rewritten in place by someone else (not how mailq writes, but its stamp changes): walked again.
    path = store.db_path("dev")
    stamp = os.stat(path)
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # a new stamp even within one clock tick
    with store.edit("dev") as mlist:
        pass
    assert len(walks) == 3
    assert other.load("dev").generation == store.load("dev").generation == 5


def test_edit_with_reuse_hands_back_its_last_list_only_while_list_pck_is_unchanged(store, settings):
    """``edit(reuse=True)`` (the bounces runner, once per batch): the object its previous edit ended
    with, unless another writer saved meanwhile or that block raised; saving works as ever."""
    with store.edit("dev", reuse=True) as first:
        first.members.add("alice@example.org")
    assert first.saved and first.generation == 2
    with store.edit("dev", reuse=True) as again:
        assert again is first and not again.saved
    assert not again.saved                                   # nothing changed: nothing written
    with store.edit("dev", reuse=True) as again:
        assert again is first
        alice = again.members.get("alice@example.org")
        alice.bounce_score = 2.0
    assert again.saved and ListStore(settings).load("dev").members.get("alice@example.org").bounce_score == 2.0
    alice.bounce_score = 99.0           # a member kept past its block no longer writes to the list
    with store.edit("dev", reuse=True) as again:
        assert again is first and again.members.get("alice@example.org").bounce_score == 2.0
    assert not again.saved
    with store.edit("dev") as plain:                          # an edit without reuse reads afresh...
        assert plain is not first
        plain.members.add("bob@example.org")
    with store.edit("dev", reuse=True) as after:              # ...and its save is a change like any other
        assert after is not first and "bob@example.org" in after.members
    other = ListStore(settings)                               # another process or host
    with other.edit("dev") as theirs:
        theirs.members.get("alice@example.org").bounce_score = 3.0
    with store.edit("dev", reuse=True) as mine:
        assert mine is not after and mine.members.get("alice@example.org").bounce_score == 3.0
        mine.members.add("carol@example.org")
    with pytest.raises(RuntimeError), store.edit("dev", reuse=True) as dirty:
        assert dirty is mine
        dirty.members.remove_many(["alice@example.org", "carol@example.org"])
        raise RuntimeError("changed my mind")
    with store.edit("dev", reuse=True) as clean:              # the raised block's changes are gone
        assert clean is not dirty and {"alice@example.org", "carol@example.org"} <= set(
            m.address for m in clean.members)
    assert store.load("dev").generation == other.load("dev").generation == 6


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_numbers_are_refused_for_float_settings(text):
    s = ListSettings(domain="example.org")
    with pytest.raises(InvalidInput, match="bounce_score_threshold must be a finite number"):
        s.set_text("bounce_score_threshold", text)
    assert s.bounce_score_threshold == 5.0
    with pytest.raises(InvalidInput, match="finite"):
        ListSettings.from_dict({"bounce_score_threshold": float(text)})


def test_longest_allowed_list_name_keeps_every_role_address_within_64_characters(store):
    from mailq.lists.validate import MAX_NAME

    name = "a" * MAX_NAME
    mlist = store.create(name, "owner@example.org", domain="example.org")
    for address in (mlist.posting_address, mlist.owner_address, mlist.request_address, mlist.bounces_address,
                    mlist.join_address, mlist.leave_address, mlist.confirm_address):
        assert len(address.split("@")[0]) <= 64
    assert max(len(a.split("@")[0]) for a in (mlist.bounces_address, mlist.request_address)) == 64
    with pytest.raises(InvalidInput, match="64-character limit on an address's local part"):
        validate_list_name(name + "a")


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 300, "with space", "Dev", ".hidden", "a..b",
                                  "dev-owner", "-x"])
def test_hostile_list_names_are_refused(store, name):
    with pytest.raises(InvalidInput):
        validate_list_name(name)
    with pytest.raises(InvalidInput):
        store.create(name, "owner@example.org")
    assert not store.exists(name)
    assert store.names() == ["dev"]


def test_settings_types_and_values_are_validated(store):
    s = ListSettings(domain="example.org")
    for key, text in [("max_message_kb", "big"), ("archive", "maybe"), ("nonmember_action", "bounce"),
                      ("owners", "not-an-address"), ("reply_to", "explicit"), ("max_held_days", "-1")]:
        with pytest.raises(InvalidInput, match=key):
            s.set_text(key, text)
    with pytest.raises(InvalidInput, match="did you mean 'subject_prefix'"):
        s.set_text("subject_prefx", "[x]")
    assert s == ListSettings(domain="example.org")  # nothing changed by the refusals
    s.set_text("moderators", "a@example.org, b@localhost")
    s.set_text("archive", "no")
    assert s.moderators == ["a@example.org", "b@localhost"] and s.archive is False
    with pytest.raises(InvalidInput, match="max_message_kb: expected whole number"):
        ListSettings.from_dict({"max_message_kb": "40"})


def test_unknown_list_is_not_found(store):
    with pytest.raises(NotFound, match="no list named 'nope'"):
        store.load("nope")


SAVER = textwrap.dedent("""
    from mailq.config import load_settings
    from mailq.lists import ListStore
    store = ListStore(load_settings())
    i = 0
    while True:
        with store.edit("dev") as mlist:
            mlist.members.add(f"user{mlist.generation}-{i}@example.org")
        i += 1
        if i == 1:
            print("saving", flush=True)
""")


def test_writer_killed_at_random_points_of_saves_leaves_a_consistent_list(node, store):
    rng = random.Random(4242)
    with store.edit("dev") as mlist:
        mlist.members.add_many(Member(f"base{i}@example.org") for i in range(3000))  # saves take a while
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", SAVER], env=node.environ(), cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving"
        proc.stdout.close()
        # Busy-wait a random amount of the writer's CPU time (no sleep-and-assert: any point is fine).
        deadline = rng.uniform(0.0, 0.15)
        start = os.times().elapsed
        while os.times().elapsed - start < deadline:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        mlist = store.load("dev")  # old or new state, never an error
        assert not mlist.loaded_from_last
        # Every save adds exactly one member and bumps the generation once.
        assert len(mlist.members) == 3000 + mlist.generation - 2
    with store.edit("dev") as mlist:  # the dead writer's lock is broken by this writer
        pass
    leftovers = [p.name for p in store.list_dir("dev").iterdir() if p.name not in ("list.pck", "list.pck.last")]
    assert all(name.endswith(".tmp") for name in leftovers)


def test_changes_to_one_member_or_to_all_members_inside_edit_are_saved(store):
    with store.edit("dev") as mlist:
        mlist.members.add_many(Member(f"m{i}@example.org", digest=i % 2 == 0) for i in range(10))
    with store.edit("dev") as mlist:  # columns stay columns: only the fetched member is patched
        m3 = mlist.members.get("M3@example.org")
        m3.status, m3.bounce_score, m3.display_name = "disabled_bounce", 3.0, "Three"
        mlist.settings.description = "patched"
    mlist = store.load("dev")
    assert mlist.members.get("m3@example.org").as_dict() | {"disabled_at": None, "joined": None} == {
        "address": "m3@example.org", "display_name": "Three", "status": "disabled_bounce", "disabled_at": None,
        "digest": "off", "moderated": False, "dont_receive_duplicates": True, "bounce_score": 3.0,
        "last_bounce": None, "joined": None, "bounce": None}
    assert "m3@example.org" not in mlist.regular_recipients() and mlist.settings.description == "patched"
    with store.edit("dev") as mlist:
        for m in mlist.members:
            m.moderated = True
    assert all(m.moderated for m in store.load("dev").members)
    assert store.load("dev").regular_recipients() == [f"m{i}@example.org" for i in (1, 5, 7, 9)]


member_rows = st.lists(st.tuples(
    st.from_regex(r"[a-z0-9._+-]{1,12}", fullmatch=True), st.text(max_size=8), st.sampled_from(STATUSES),
    st.sampled_from(["off", "mime", "plain", True, False]), st.booleans(), st.booleans(),
    st.sampled_from([0.0, 1.5, 4.0]),
    st.sampled_from([None, 1795313677.5])), max_size=30)


@settings(max_examples=40, deadline=None)
@given(rows=member_rows, patch=st.data())
def test_member_columns_round_trip_and_patches_match_full_rows(rows, patch):
    roster = Roster()
    for i, (local, name, status, digest, moderated, nodupes, score, last) in enumerate(rows):
        m = Member(f"{local}.{i}@example.org", name, status=status, digest=digest, moderated=moderated,
                   dont_receive_duplicates=nodupes, bounce_score=score, last_bounce=last, joined=1000.0 + i)
        roster.add(m)
    want = [m.as_dict() for m in roster]
    loaded = Roster.from_stored(safepickle.loads(safepickle.dumps(roster.to_stored())))
    assert [m.as_dict() for m in loaded] == want
    assert loaded.regular() == roster.regular() and loaded.digest() == roster.digest()
    assert all(loaded.digest(fmt) == roster.digest(fmt) for fmt in ("mime", "plain"))
    if rows:  # change one member through a column-mode patch and through full rows: same result
        victim = want[patch.draw(st.integers(0, len(rows) - 1))]["address"].upper()
        rowwise = Roster.from_stored(loaded.to_stored())
        rowwise.materialize()
        for r in (loaded, rowwise):
            r.editable = True  # as ListStore.edit opens it
            m = r.get(victim)
            m.status, m.bounce_score = "disabled_user", 2.0
            m.digest = {"off": "plain", "plain": "mime", "mime": "off"}[m.digest]
            m.disabled_at = 1795313999.0 if m.status != "enabled" else None
        again = Roster.from_stored(safepickle.loads(safepickle.dumps(loaded.to_stored())))
        assert [m.as_dict() for m in again] == [m.as_dict() for m in rowwise]


def test_recipients_stay_right_after_members_are_fetched_from_a_loaded_roster():
    """Moderation calls get() on every post; recipients must still honour each member's state."""
    from mailq.lists.members import Roster

    roster = Roster([])
    for i in range(50):
        roster.add(f"user{i}@example.org")
    loaded = Roster.from_stored(roster.to_stored())
    loaded.editable = True  # as ListStore.edit opens it
    loaded.get("USER5@example.org").digest = True
    loaded.get("user7@example.org").status = "disabled_user"
    loaded.get("user9@example.org")  # fetched, unchanged
    regular = loaded.regular()
    assert len(regular) == 48
    assert "user5@example.org" not in regular and "user7@example.org" not in regular
    assert "user9@example.org" in regular
    assert loaded.digest() == ["user5@example.org"]


def test_a_look_up_in_a_loaded_list_never_changes_the_list_the_store_shares(store):
    """ListStore.load hands every post the same object: moderation's get() must leave it as it was."""
    with store.edit("dev") as mlist:
        for i in range(5):
            mlist.members.add(f"user{i}@example.org")
    shared = store.load("dev")
    before = (shared.to_stored(), shared.regular_recipients())
    member = shared.members.get("USER3@example.org")
    member.moderated = True  # a stage that wrongly changed a member would change nothing shared
    again = store.load("dev")
    assert again is shared and (again.to_stored(), again.regular_recipients()) == before
    assert not again.members.get("user3@example.org").moderated
