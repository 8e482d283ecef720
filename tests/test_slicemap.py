"""The slice map: validation, hand edits, CLI edits, epochs, rebalance, concurrent updates (docs/cluster.md §1)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml

from mailq.cluster import slicemap as sm
from mailq.config import RUNNER_QUEUES
from tests.support import ROOT, make_node, wait_for


def map_text(epoch: int = 5, out: str = "{h1: [0, 1], h2: [2, 3]}", count: int = 4,
             nodes: str = "{h1: {backup: h2}, h2: {backup: h1}}") -> str:
    lines = [f"epoch: {epoch}", "queues:", f"  out: {{count: {count}, nodes: {out}}}"]
    lines += [f"  {q}: {{count: 1, nodes: {{h1: [0]}}}}" for q in RUNNER_QUEUES if q != "out"]
    lines.append(f"nodes: {nodes}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def cluster(tmp_path):
    """Node h1 with a valid map (epoch 5) installed."""
    node = make_node(tmp_path, "h1")
    settings = node.settings()
    settings.cluster_dir.mkdir(parents=True)
    settings.slice_map_path.write_text(map_text())
    return node, settings


def test_a_valid_map_parses_and_answers_owner_questions():
    smap = sm.parse_map(map_text())
    assert smap.epoch == 5
    assert smap.count("out") == 4
    assert [smap.owner_of("out", s) for s in range(4)] == ["h1", "h1", "h2", "h2"]
    assert ("out", 2, 4) in smap.slices_for("h2")
    assert sm.parse_map(smap.dump()).to_dict() == smap.to_dict()


@pytest.mark.parametrize("text, expected", [
    (map_text(out="{h1: [0, 1, 2], h2: [2, 3]}"), "overlap: slice 2 of 4 is owned by h1, h2"),
    (map_text(out="{h1: [0], h2: [2, 3]}"), "gap: slice 1 of 4 has no owner"),
    (map_text(out="{h1: [0, 1], h9: [2, 3]}"), "unknown node 'h9'"),
    (map_text(out="{h1: [0, 1, 2, 3, 4]}"), "slice 4 of node h1 is out of range 0..3"),
    (map_text(count=0, out="{}"), "count must be a whole number >= 1"),
    (map_text(nodes="{h1: {backup: h2}, h2: {fenced: true}}"), "owned by fenced node 'h2'"),
    (map_text(nodes="{h1: {backup: h7}, h2: {}}"), "nodes.h1.backup: unknown node 'h7'"),
    ("epoch: 3\nqueues: [\n", "not valid YAML"),
    ("just a string\n", "expected a mapping"),
    (map_text().replace("  out:", "  out: {count: 1, nodes: {h1: [0]}}\n  out:"), "duplicate key 'out'"),
    (map_text().replace("  in: {count: 1, nodes: {h1: [0]}}\n", ""), "queues.in: missing"),
    (map_text(epoch=-1), "epoch must be a whole number >= 0"),
])
def test_invalid_maps_are_refused_with_a_reason(text, expected):
    with pytest.raises(sm.SliceMapError) as err:
        sm.parse_map(text, "slices.yaml")
    assert expected in str(err.value)
    assert "previous map stays in force" in str(err.value)


def test_an_invalid_hand_edit_keeps_the_previous_map_and_check_exits_1(cluster):
    node, settings = cluster
    watcher = sm.MapWatcher(settings)
    assert watcher.current().epoch == 5
    settings.slice_map_path.write_text(map_text(epoch=6, out="{h1: [0, 1, 2], h2: [2, 3]}"))
    assert watcher.current().epoch == 5            # still the old map
    assert "overlap" in watcher.problem
    fresh = sm.MapWatcher(settings)                # a master that just started: the newest epoch file
    assert fresh.current().epoch == 5 and fresh.problem
    check = node.mailq("slices", "check")
    assert check.returncode == 1
    assert "overlap: slice 2 of 4 is owned by h1, h2" in check.stdout
    status = node.mailq("cluster", "status", "--json")
    assert status.returncode == 1
    data = json.loads(status.stdout)
    assert "overlap" in data["map_problem"] and data["epoch"] == 5 and data["map_in_force"] == "epoch file"
    settings.slice_map_path.write_text(map_text(epoch=6))     # fixed
    assert watcher.current().epoch == 6 and watcher.problem == ""
    assert node.mailq("slices", "check").returncode == 0


def test_a_gapped_hand_edit_is_refused_by_a_running_master_which_logs_it_until_fixed(cluster):
    node, settings = cluster
    master = node.popen("mailqctl", "start", "--foreground", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = settings.log_dir / "master.log"
    try:
        wait_for(lambda: log.exists() and "master running" in log.read_text(), 60, message="master running")
        settings.slice_map_path.write_text(map_text(epoch=6, out="{h1: [0, 1], h2: [3]}"))     # slice 2: nobody
        wait_for(lambda: "gap: slice 2 of 4 has no owner" in log.read_text(), 30,
                 message="the master logging the gap")
        assert "previous map stays in force" in log.read_text()
        status = node.mailq("cluster", "status", "--json", "--no-queues")
        assert status.returncode == 1 and "gap: slice 2 of 4" in json.loads(status.stdout)["map_problem"]
        assert json.loads(status.stdout)["epoch"] == 5
        settings.slice_map_path.write_text(map_text(epoch=6, out="{h1: [0, 1, 2], h2: [3]}"))
        wait_for(lambda: "slice map problem fixed: epoch 6 in force" in log.read_text(), 30,
                 message="the master logging the fix")
        wait_for(lambda: "started runner out:2/4" in log.read_text(), 30,       # and running its new slice
                 message="the master starting the runner of its new slice")
    finally:
        master.terminate()
        master.wait(timeout=60)


def test_garbage_and_deleted_map_files_keep_the_last_good_map(cluster):
    node, settings = cluster
    watcher = sm.MapWatcher(settings)
    watcher.current()
    settings.slice_map_path.write_bytes(b"\x00\xff garbage: [\n")
    assert watcher.current().epoch == 5 and watcher.problem
    assert node.mailq("slices", "check").returncode == 1
    settings.slice_map_path.unlink()
    assert watcher.current().epoch == 5 and "missing" in watcher.problem


def test_a_hand_edit_must_raise_the_epoch(cluster):
    node, settings = cluster
    watcher = sm.MapWatcher(settings)
    watcher.current()
    settings.slice_map_path.write_text(map_text(epoch=5, out="{h1: [0], h2: [1, 2, 3]}"))
    assert watcher.current().owner_of("out", 1) == "h1"
    assert "epoch 5 is not above" in watcher.problem
    # show and status show the map in force, not the refused file, and say why it is refused.
    show = node.mailq("slices", "show", "--json")
    assert show.returncode == 1 and "REFUSED" in show.stderr and "epoch 5 is not above" in show.stderr
    shown = json.loads(show.stdout)
    assert shown["queues"]["out"]["nodes"] == {"h1": [0, 1], "h2": [2, 3]}
    assert shown["in_force_from"] == "epoch file"
    status = json.loads(node.mailq("cluster", "status", "--json", "--no-queues").stdout)
    assert status["map_in_force"] == "epoch file" and "epoch 5 is not above" in status["map_problem"]
    # A CLI change starts from the map in force (and replaces the refused file), not from the edit.
    node.mailq("slices", "assign", "out", "3", "h1", check=True)
    smap = sm.load_map(settings.slice_map_path)
    assert smap.epoch == 6 and smap.queues["out"] == ["h1", "h1", "h2", "h1"]
    assert "h2: [1, 2, 3]" in settings.slice_map_path.with_name("slices.yaml.last").read_text()
    assert watcher.current().epoch == 6 and not watcher.problem
    settings.slice_map_path.write_text(map_text(epoch=7, out="{h1: [0], h2: [1, 2, 3]}"))
    smap = watcher.current()
    assert smap.epoch == 7 and smap.owner_of("out", 1) == "h2" and not watcher.problem


def test_cli_changes_bump_the_epoch_and_a_no_op_does_not(cluster):
    node, settings = cluster
    node.mailq("slices", "assign", "out", "0", "1", "h2", check=True)
    smap = sm.load_map(settings.slice_map_path)
    assert smap.epoch == 6 and smap.queues["out"] == ["h2"] * 4
    node.mailq("slices", "assign", "out", "0", "h2", check=True)
    assert sm.load_map(settings.slice_map_path).epoch == 6
    typo = node.mailq("slices", "assign", "out", "0", "h22")
    assert typo.returncode == 1 and "not in the slice map" in typo.stderr and "rebalance --nodes" in typo.stderr
    bad = node.mailq("slices", "assign", "out", "9", "h2")
    assert bad.returncode == 1 and "there is no slice 9" in bad.stderr
    assert sm.load_map(settings.slice_map_path).epoch == 6
    assert (settings.slice_map_path.with_name("slices.yaml.last")).exists()


def test_slices_edit_validates_before_installing(cluster, tmp_path):
    node, settings = cluster
    editor = tmp_path / "editor.py"
    for repl, why in (("'h2: [2, 3, 1]'", "overlap: slice 1 of 4"), ("'h2: [2, 3'", "not valid YAML"),
                      ("'h2: [3]'", "gap: slice 2 of 4 has no owner")):
        editor.write_text(textwrap.dedent(f"""\
            import sys
            path = sys.argv[1]
            text = open(path).read()
            open(path, "w").write(text.replace("h2: [2, 3]", {repl}))
        """))
        result = node.mailq("slices", "edit", env={"EDITOR": f"{sys.executable} {editor}"})
        assert result.returncode == 1, result.stderr
        assert "Nothing changed" in result.stderr and why in result.stderr
        assert sm.load_map(settings.slice_map_path).epoch == 5
    editor.write_text(textwrap.dedent("""\
        import sys
        path = sys.argv[1]
        text = open(path).read()
        open(path, "w").write(text.replace("h1: [0, 1]", "h1: [0]").replace("h2: [2, 3]", "h2: [1, 2, 3]"))
    """))
    result = node.mailq("slices", "edit", env={"EDITOR": f"{sys.executable} {editor}"})
    assert result.returncode == 0, result.stderr
    smap = sm.load_map(settings.slice_map_path)
    assert smap.epoch == 6 and smap.queues["out"] == ["h1", "h2", "h2", "h2"]


def test_rebalance_spreads_evenly_with_fewest_moves():
    assert sm.rebalance_owners(["a"] * 4 + ["b", "c"], ["a", "b", "c"]) == ["a", "a", "b", "c", "b", "c"]
    owners = ["a", "a", "a", "b", "b", "b"]
    new = sm.rebalance_owners(owners, ["a", "b", "c"])
    assert sorted(new.count(n) for n in "abc") == [2, 2, 2]
    assert sum(o != n for o, n in zip(owners, new, strict=True)) == 2       # the minimum
    # dropping a node moves only that node's slices
    owners = ["a", "b", "c", "a", "b", "c"]
    new = sm.rebalance_owners(owners, ["a", "b"])
    assert sum(o != n for o, n in zip(owners, new, strict=True)) == 2 and new.count("a") == new.count("b") == 3
    # already even: nothing moves
    assert sm.rebalance_owners(owners, ["a", "b", "c"]) == owners


def test_init_spreads_one_slice_queues_over_nodes_and_refuses_a_second_time(tmp_path):
    node = make_node(tmp_path, "h1", runners={"slices": {"out": 4}})
    node.mailq("slices", "init", "--nodes", "h1,h2,h3", check=True)
    smap = sm.load_map(node.settings().slice_map_path)
    assert smap.count("out") == 4 and set(smap.queues["out"]) == {"h1", "h2", "h3"}
    assert {smap.owner_of(q, 0) for q in RUNNER_QUEUES if q != "out"} == {"h1", "h2", "h3"}
    assert smap.nodes["h3"].backup == "h1"
    again = node.mailq("slices", "init", "--nodes", "h1")
    assert again.returncode == 1 and "exists already" in again.stderr


def slice_rows(text: str) -> dict[str, str]:
    """Table rows of CLI output keyed by their first column, a slice label like ``out:0/2``."""
    return {line.split()[0]: line for line in text.splitlines() if re.match(r"\w+:\d+/\d+ ", line)}


def test_set_count_refuses_while_entries_wait_unless_forced_and_says_what_moves(cluster):
    from mailq.queue import Queue
    from mailq.queue.names import split_id

    node, settings = cluster
    eid = Queue.for_settings(settings, "out").enqueue(b"Subject: x\n\nx\n", {"listname": "dev"})
    refused = node.mailq("slices", "set-count", "out", "2")
    assert refused.returncode == 1 and "1 waiting entries" in refused.stderr and "--force" in refused.stderr
    assert sm.load_map(settings.slice_map_path).count("out") == 4
    # The preview: out:0/2 covers old slices 0 and 1 (both h1's), out:1/2 covers 2 and 3 (h2's).
    lines = slice_rows(refused.stdout)
    assert "00000000-7fffffff" in lines["out:0/2"] and "h1 (out:0/4), h1 (out:1/4)" in lines["out:0/2"]
    assert "80000000-ffffffff" in lines["out:1/2"] and "h2 (out:2/4), h2 (out:3/4)" in lines["out:1/2"]
    assert all(line.split()[-1] == "0" for line in lines.values())     # nobody's entries change node
    forced = node.mailq("slices", "set-count", "out", "3", "--force", check=True)
    assert "out: 4 -> 3 slices" in forced.stdout
    smap = sm.load_map(settings.slice_map_path)
    assert smap.queues["out"] == ["h1", "h1", "h2"] and smap.epoch == 6
    table = {k: line.split()[-1] for k, line in slice_rows(forced.stdout).items()}
    assert table == {"out:0/3": "h1", "out:1/3": "h1", "out:2/3": "h2"}
    # Going back to 2 would move the waiting entry if it sits in the middle third.
    sha = split_id(eid)[1]
    again = node.mailq("slices", "set-count", "out", "2")
    rows = {k: line.split()[-1] for k, line in slice_rows(again.stdout).items()}
    from mailq.queue.names import slice_of

    moving = int(smap.queues["out"][slice_of(sha, 3)] != ["h1", "h2"][slice_of(sha, 2)])
    assert rows[f"out:{slice_of(sha, 2)}/2"] == str(moving)


def test_concurrent_assigns_from_two_processes_lose_no_update(cluster):
    node, settings = cluster
    settings.slice_map_path.write_text(map_text(count=16, out="{h1: [" + ", ".join(map(str, range(16))) + "]}"))
    script = textwrap.dedent("""\
        import sys
        from mailq.config import load_settings
        from mailq.cluster.slicemap import update_map, NodeEntry
        settings = load_settings(sys.argv[1])
        me, slices = sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
        for s in slices:
            def change(smap, s=s):
                smap.nodes.setdefault(me, NodeEntry())
                smap.queues["out"][s] = me
            update_map(settings, change)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(node.config), who, ",".join(map(str, rng))],
                              cwd=ROOT, env=node.environ())
             for who, rng in (("pa", range(0, 16, 2)), ("pb", range(1, 16, 2)))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    smap = sm.load_map(settings.slice_map_path)
    assert smap.queues["out"] == ["pa", "pb"] * 8
    assert smap.epoch == 5 + 16


def test_assignments_without_a_map_cover_every_slice_from_config(tmp_path):
    settings = make_node(tmp_path, "h1", runners={"slices": {"out": 3}}).settings()
    got = sm.assignments_for(settings, None, "h1")
    assert ("out", 2, 3) in got and ("in", 0, 1) in got and len(got) == len(RUNNER_QUEUES) + 2
    smap = sm.parse_map(map_text(nodes="{h1: {backup: h2}, h2: {}}"))
    assert sm.assignments_for(settings, smap, "h2") == [("out", 2, 4), ("out", 3, 4)]
    smap.nodes["h2"].fenced = True
    assert sm.assignments_for(settings, smap, "h2") == []


def test_the_dumped_map_is_readable_yaml_with_a_comment(cluster):
    node, settings = cluster
    node.mailq("slices", "assign", "out", "0", "h2", check=True)
    text = settings.slice_map_path.read_text()
    assert text.startswith("# mailq slice map")
    assert yaml.safe_load(text)["queues"]["out"]["nodes"] == {"h2": [0, 2, 3], "h1": [1]}
    assert sm.epoch_path(settings, 6).read_text() == text     # slices.yaml is the copy of the epoch file


def test_the_sample_map_in_etc_is_valid():
    smap = sm.load_map(ROOT / "etc" / "slices.yaml")
    assert smap.count("out") == 6 and smap.nodes["h1"].backup == "h2"


def test_a_late_copy_of_an_older_epoch_is_not_a_hand_edit(cluster):
    node, settings = cluster
    watcher = sm.MapWatcher(settings)
    assert watcher.current().epoch == 5                      # the hand-written first map, published
    node.mailq("slices", "assign", "out", "0", "h2", check=True)
    assert watcher.current().epoch == 6
    # The writer of epoch 5 writes its copy of slices.yaml late (after epoch 6 was published):
    settings.slice_map_path.write_text(sm.epoch_path(settings, 5).read_text())
    assert watcher.current().epoch == 6 and watcher.problem == ""
    assert sm.load_map(settings.slice_map_path).epoch == 6    # the copy of the map in force is put back


def test_an_epoch_is_created_once_and_old_epochs_are_pruned(cluster):
    node, settings = cluster
    smap = sm.map_in_force(settings).smap
    taken = smap.copy()
    taken.epoch += 1
    assert sm.publish(settings, taken)
    rival = smap.copy()
    rival.epoch += 1
    rival.queues["out"][0] = "h2"
    assert not sm.publish(settings, rival)                   # epoch 6 exists: the second writer loses
    with pytest.raises(sm.SliceMapError, match="epoch 6 was written by another writer"):
        sm.write_map(settings, rival)
    assert sm.latest_map(settings).to_dict() == taken.to_dict()
    old = taken.copy()
    old.epoch = 3                                            # a writer frozen since epoch 2, say
    assert not sm.publish(settings, old) and 3 not in sm.epochs_on_disk(settings)
    for _ in range(sm.KEEP_EPOCHS + 5):
        node_map = sm.latest_map(settings)
        owner = node_map.queues["out"][0]
        sm.update_map(settings, lambda m, o=owner: m.queues["out"].__setitem__(0, "h2" if o == "h1" else "h1"))
    kept = sm.epochs_on_disk(settings)
    assert len(kept) == sm.KEEP_EPOCHS and kept[-1] == 6 + sm.KEEP_EPOCHS + 5
    assert sm.load_map(settings.slice_map_path).epoch == kept[-1]


def test_a_runners_guard_looks_at_one_folder_only(cluster, monkeypatch):
    node, settings = cluster
    watcher = sm.MapWatcher(settings, hand_edits=False)
    sm.MapWatcher(settings).current()                        # a master published the map
    assert watcher.current().epoch == 5
    seen = []
    real = os.stat
    monkeypatch.setattr(sm.os, "stat", lambda p, *a, **k: seen.append(str(p)) or real(p, *a, **k))
    for _ in range(10):
        watcher.current()
    assert seen == [str(sm.maps_dir(settings))] * 10


def test_a_damaged_epoch_file_is_skipped_and_reported_not_taken_for_no_map(cluster):
    node, settings = cluster
    assert sm.MapWatcher(settings).current().epoch == 5          # published from the hand-written file
    sm.epoch_path(settings, 6).write_text("epoch: 6\nqueues: [\n")  # damage, with a higher number
    fresh = sm.MapWatcher(settings)                               # a master that just started
    assert fresh.current().epoch == 5 and "0000000006.yaml is damaged" in fresh.problem
    check = node.mailq("slices", "check")
    assert check.returncode == 1 and "is damaged" in check.stdout
    node.mailq("slices", "assign", "out", "0", "h2", check=True)   # the next change goes past it
    assert sm.latest_map(settings).epoch == 7


def test_the_set_count_policy_refuses_while_entries_wait_and_says_what_would_move(cluster):
    from mailq.cluster import policy
    from mailq.queue import Queue

    node, settings = cluster
    Queue.for_settings(settings, "out").enqueue(b"Subject: x\r\n\r\nx\r\n", {})
    with pytest.raises(policy.RecountRefused) as info:
        policy.set_count(settings, "out", 2)
    refused = info.value
    assert refused.waiting == 1 and (refused.old_count, refused.new_count) == (4, 2)
    assert [(r.slice, r.to) for r in refused.rows] == [("out:0/2", "h1"), ("out:1/2", "h2")]
    assert sum(r.moving for r in refused.rows) == 0          # h1 keeps slices 0-1's half, h2 keeps 2-3's
    assert sm.load_map(settings.slice_map_path).epoch == 5   # nothing changed
    old, new = policy.set_count(settings, "out", 2, force=True)
    assert (old.epoch, new.epoch) == (5, 6) and new.queues["out"] == ["h1", "h2"]
    assert policy.recount_owners(["a", "b", "a"], 4) == ["a", "a", "b", "b"]
