"""mailqctl and the master as real daemons: start/status/stop, stale locks, restarts, caps, SIGHUP."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mailq.fsutil import pid_alive
from mailq.queue import Claimant, Queue
from tests.support import make_node, wait_for


def status(node) -> dict:
    result = node.run("mailqctl", "status", "--json")
    return json.loads(result.stdout)


def runner(node, name: str) -> dict:
    """One runner's row from the master's status file (polled often: no process per look)."""
    from mailq.runstate import read_status

    state = read_status(node.settings()) or {"runners": []}
    return next((r for r in state["runners"] if r["name"] == name), {"pid": None, "state": "", "restarts": -1})


def runner_pid(node, name: str) -> int | None:
    return runner(node, name)["pid"]


@pytest.fixture
def started():
    """Start masters with ``started(node)``; every one still running is stopped (or killed) afterwards."""
    nodes = []

    def start(node, *args: str):
        result = node.run("mailqctl", "start", *args)
        assert result.returncode == 0, result.stderr
        nodes.append(node)
        return result

    yield start
    from mailq.master import running_pid

    for node in nodes:      # every one, even when the test (or a stop) failed for an earlier one
        pid = running_pid(node.settings())
        node.run("mailqctl", "stop", "--timeout", "120")
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_start_status_stop_and_a_second_start_is_refused(node, started):
    result = started(node)
    pid = int(result.stdout.split("pid ")[1].rstrip(")\n"))
    assert pid_alive(pid)
    assert (node.settings().run_dir / "master.pid").read_text().strip() == str(pid)
    wait_for(lambda: runner_pid(node, "virgin"), 60, message="virgin runner running")
    text = node.run("mailqctl", "status")
    assert text.returncode == 0 and f"running, pid {pid}" in text.stdout
    assert "virgin" in text.stdout and "RESTARTS" in text.stdout

    second = node.run("mailqctl", "start")
    assert second.returncode == 1 and f"already running (pid {pid})" in second.stderr

    runner_pids = [r["pid"] for r in status(node)["runners"] if r["pid"]]
    stopped = node.run("mailqctl", "stop")
    assert stopped.returncode == 0 and f"pid {pid}" in stopped.stdout
    assert not pid_alive(pid) and not any(pid_alive(p) for p in runner_pids)
    assert not (node.settings().run_dir / "master.pid").exists()
    after = node.run("mailqctl", "status")
    assert after.returncode == 3 and "not running" in after.stdout
    assert node.run("mailqctl", "stop").returncode == 0      # stopping a stopped master is fine


def test_a_sigkilled_master_leaves_nothing_that_blocks_the_next_start_which_recovers_dead_claims(
        tmp_path, started):
    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    settings = node.settings()
    started(node)
    first = status(node)
    old_pid = first["pid"]
    virgin = wait_for(lambda: runner_pid(node, "virgin"), 60, message="virgin runner running")
    lmtp = wait_for(lambda: runner_pid(node, "lmtp"), 60, message="lmtp runner running")
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old_pid), 30, message="master gone")
    # Its runners notice the master is gone and stop by themselves (lmtp too: it holds the port).
    wait_for(lambda: not pid_alive(virgin) and not pid_alive(lmtp), 30, message="orphaned runners exit")
    stale = node.run("mailqctl", "status")
    assert stale.returncode == 1 and f"stale pid file of pid {old_pid}" in stale.stdout
    # A claim left by a process of this node that is gone: only the master's recovery at start
    # brings it back (the commands runner may take it at once after that, so the log says it).
    queue = Queue.for_settings(settings, "commands")
    eid = queue.enqueue(b"Subject: x\r\n\r\nbody\r\n", {"n": 1})
    claimed = queue.claim(eid, Claimant(node.name, old_pid, 0))
    assert claimed is not None and claimed.path.exists()
    started(node)
    new_pid = status(node)["pid"]
    assert new_pid != old_pid and pid_alive(new_pid)
    assert not claimed.path.exists()
    log = (settings.log_dir / "master.log").read_text()
    assert "recovery of dead local claims: 1 back in their queues" in log
    assert f"'id': '{eid}'" in log and "'recovered': 1" in log
    wait_for(lambda: runner_pid(node, "lmtp"), 60, message="the new master's lmtp runner")
    assert runner(node, "lmtp")["restarts"] == 0


def test_a_killed_runner_is_restarted_with_growing_delays_until_the_restart_cap(tmp_path, started):
    node = make_node(tmp_path, "n1", runners={"poll_interval": 0.2, "restart_cap": 3})
    started(node)
    seen = []
    for restarts in range(4):
        pid = wait_for(lambda: (runner(node, "virgin")["state"] == "running" and runner_pid(node, "virgin")),
                       60, message=f"virgin runner running after {restarts} restarts")
        assert pid not in seen
        seen.append(pid)
        os.kill(pid, signal.SIGKILL)
        want = min(restarts + 1, 3)
        wait_for(lambda pid=pid, want=want: runner(node, "virgin")["restarts"] == want and not pid_alive(pid),
                 60, message="master noticed the kill")
    final = wait_for(lambda: runner(node, "virgin")["state"] == "failed" and runner(node, "virgin"), 60,
                     message="virgin runner left down")
    assert final["pid"] is None and final["restarts"] == 3 and final["last_exit"] == -signal.SIGKILL
    log = (node.settings().log_dir / "master.log").read_text()
    assert "restart cap reached, LEAVING IT DOWN" in log
    # The waits, from the master's own timestamps: each death -> the next start of virgin.
    announced, measured = restart_delays(log, "virgin")
    assert announced == [0.5, 1.0, 2.0], announced
    assert all(got >= want - 0.05 for got, want in zip(measured, announced, strict=True)), (measured, announced)
    assert measured[0] < measured[1] < measured[2], f"delays between restarts must grow: {measured}"


def restart_delays(log: str, name: str) -> tuple[list[float], list[float]]:
    """(delays the master announced, seconds from each 'died' line to the next 'started' line)."""
    import re
    from datetime import datetime

    def at(line: str) -> float:
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    announced, measured, died = [], [], None
    for line in log.splitlines():
        m = re.search(rf"runner {name}\S* died .*; restart \d+ of \d+ in ([\d.]+)s", line)
        if m:
            announced.append(float(m.group(1)))
            died = at(line)
        elif died is not None and re.search(rf"started runner {name}\S* \(pid", line):
            measured.append(at(line) - died)
            died = None
    return announced, measured


def test_reopen_makes_the_master_and_its_runners_reopen_their_logs(node, started):
    started(node)
    log_dir = node.settings().log_dir
    virgin = wait_for(lambda: runner_pid(node, "virgin"), 60, message="virgin runner running")
    wait_for(lambda: "started" in _read(log_dir / "virgin.log"), 60, message="virgin runner logging")
    # No wait for the other runners: one still starting when the SIGHUP comes must keep it for
    # later (it starts with SIGHUP blocked), not die of it or of a reopen in the middle of an import.
    pids = {r["name"]: r["pid"] for r in status(node)["runners"]}
    (log_dir / "master.log").rename(log_dir / "master.log.1")
    (log_dir / "virgin.log").rename(log_dir / "virgin.log.1")
    result = node.run("mailqctl", "reopen")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "log files reopened" in _read(log_dir / "master.log"), 30, message="new master.log")
    for name in pids:
        log = log_dir / f"{name}.log"
        wait_for(lambda log=log: "log files reopened" in _read(log), 30,
                 message=f"'log files reopened' in {log.name} (a runner killed by the SIGHUP starts a new one)")
    assert {r["name"]: r["pid"] for r in status(node)["runners"]} == pids      # reopened, none restarted
    assert runner_pid(node, "virgin") == virgin


def test_foreground_master_stops_cleanly_on_sigterm(node):
    proc = node.popen("mailqctl", "start", "--foreground", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: status(node)["running"] and runner_pid(node, "virgin"), 60, message="master up")
        virgin = runner_pid(node, "virgin")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"master stopped" in err
    assert not pid_alive(virgin)
    assert not (node.settings().run_dir / "master.pid").exists()


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_the_master_follows_the_slice_map_stopping_and_starting_runners(node, settings, started):
    from mailq.cluster.slicemap import NodeEntry, SliceMap, create_map, update_map
    from mailq.config import RUNNER_QUEUES

    queues = {q: [node.name] for q in RUNNER_QUEUES}
    queues["out"] = [node.name, node.name]
    create_map(settings, SliceMap(queues=queues, nodes={node.name: NodeEntry(backup="n2"),
                                                        "n2": NodeEntry(backup=node.name)}))
    started(node)

    def outs() -> dict[int, int | None]:
        from mailq.runstate import read_status

        state = read_status(settings) or {"runners": []}
        return {r["slice"]: r["pid"] for r in state["runners"] if r["name"] == "out"}

    first = wait_for(lambda: (o := outs()).keys() == {0, 1} and all(o.values()) and o, 60,
                     message="out:0/2 and out:1/2 running")

    def give_slice_1(owner: str):
        def change(smap):
            smap.queues["out"][1] = owner
        update_map(settings, change)

    give_slice_1("n2")
    wait_for(lambda: outs().keys() == {0}, 60, message="out:1/2 stopped after its slice moved to n2")
    assert not pid_alive(first[1]) and outs()[0] == first[0]
    give_slice_1(node.name)
    back = wait_for(lambda: (o := outs()).get(1) and o, 60, message="out:1/2 started again")
    assert back[1] != first[1] and back[0] == first[0]
    assert status(node)["epoch"] == 3


def test_restart_takes_a_timeout_like_stop(node, started):
    first = started(node)
    old = int(first.stdout.split("pid ")[1].rstrip(")\n"))
    bad = node.run("mailqctl", "restart", "--timeout", "-1")
    assert bad.returncode == 2 and "--timeout" in bad.stderr and pid_alive(old)
    result = node.run("mailqctl", "restart", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert f"stopped mailq master for node n1 (pid {old})" in result.stdout
    new = status(node)["pid"]
    assert new and new != old and not pid_alive(old)
    assert "--timeout" in node.run("mailqctl", "restart", "--help").stdout


def test_two_nodes_on_one_machine_each_run_their_own_master(tmp_path, started):
    n1 = make_node(tmp_path, "n1")
    n2 = make_node(tmp_path, "n2", var=n1.var)
    started(n1)
    started(n2)
    one, two = status(n1), status(n2)
    assert one["running"] and two["running"] and one["pid"] != two["pid"]
    assert one["node"] == "n1" and two["node"] == "n2"
    refused = n2.run("mailqctl", "start")
    assert refused.returncode == 1 and f"pid {two['pid']}" in refused.stderr


def test_a_full_disk_under_the_status_files_is_logged_and_never_stops_the_master(node, monkeypatch, caplog):
    # atomic_write reports ENOSPC, EIO, ESTALE, EROFS as TemporaryFailure, not OSError: the beat
    # loop must log those like any other write failure instead of letting them end serve().
    import logging

    import mailq.cluster.presence as presence_mod
    import mailq.master as master_mod
    from mailq.errors import TemporaryFailure

    def full(path, *args, **kwargs):
        raise TemporaryFailure(f"cannot write {path}: No space left on device (free space, then retry)")

    monkeypatch.setattr(master_mod, "atomic_write", full)
    monkeypatch.setattr(presence_mod, "atomic_write", full)
    master = master_mod.Master(node.settings(), logging.getLogger("test.master.full"))
    with caplog.at_level(logging.WARNING, logger="test.master.full"):
        master._write_status()
        master.presence.publish(master.status(), stopped=True)
    assert "status.json: No space left on device" in caplog.text
    assert f"{presence_mod.shared_status_path(node.settings())}: No space left on device" in caplog.text


def test_two_sites_with_one_node_name_and_one_run_folder_never_touch_each_other(tmp_path, started):
    # Two sites on one host (issue 12): both call their node "n1" and share paths.run, but their
    # var trees differ.  Each has its own master; stop/status of one never reach the other's.
    run = tmp_path / "run"
    a = make_node(tmp_path / "a", "n1", paths={"run": str(run)})
    b = make_node(tmp_path / "b", "n1", paths={"run": str(run)})
    assert a.settings().run_dir != b.settings().run_dir and a.settings().run_dir.parent == run
    pid_a = int(started(a).stdout.split("pid ")[1].rstrip(")\n"))
    pid_b = int(started(b).stdout.split("pid ")[1].rstrip(")\n"))
    assert pid_a != pid_b and status(a)["pid"] == pid_a and status(b)["pid"] == pid_b
    stopped = a.run("mailqctl", "stop")
    assert stopped.returncode == 0 and f"pid {pid_a}" in stopped.stdout
    assert not pid_alive(pid_a) and pid_alive(pid_b)
    assert status(b)["running"] is True and status(a)["running"] is False


def test_start_returns_once_the_lmtp_port_accepts_connections(tmp_path, started):
    import socket

    node = make_node(tmp_path, "n1", lmtp={"enabled": True})
    started(node)
    settings = node.settings()
    # No waiting here: `start` returning means the MTA can deliver now.
    with socket.create_connection((settings.lmtp.host, settings.lmtp.port), timeout=10) as conn:
        assert conn.recv(512).startswith(b"220 ")


def test_start_fails_clearly_when_the_lmtp_port_is_taken(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        node = make_node(tmp_path, "n1", lmtp={"enabled": True, "port": taken.getsockname()[1]},
                         runners={"restart_cap": 0})
        # The port accepts connections (ours), but not the listener's: start must not call that up.
        res = node.run("mailqctl", "start")
    assert res.returncode == 1 and "LMTP listener exited" in res.stderr and "lmtp.log" in res.stderr, res.stderr
    assert status(node)["running"] is False


# A stand-in listener: binds, prints its port, listens once told "go" on stdin, greets, reports the QUIT.
GREETER = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True)
sys.stdin.readline(); s.listen(1); s.settimeout(60)   # no master connecting: fail, never hang
conn, _ = s.accept(); conn.sendall(b"220 greeter ready\\r\\n")
print(conn.recv(64).decode().strip(), flush=True)
"""


def _listener_classes(port: int) -> dict[str, type]:
    from mailq.runners.process import RunnerProcess

    class Greeter(RunnerProcess):
        name, unsliced = "greeter", True

        @classmethod
        def ready_address(cls, settings):
            return "0.0.0.0", port            # a wildcard host: tried on loopback

        def serve(self, once: bool) -> int:
            return 0

    class Quiet(RunnerProcess):             # listens nowhere: start-up never waits for it
        name, unsliced = "quiet", True

        def serve(self, once: bool) -> int:
            return 0

    return {"greeter": Greeter, "quiet": Quiet}


def test_start_up_waits_for_every_runner_whose_class_gives_a_ready_address(node):
    # The hook, not a runner's name, decides: a runner class that is not the LMTP listener but says
    # where it listens is waited for; one without a ready_address is not (its process is not even there).
    import logging
    import threading

    from mailq.master import Child, Master

    proc = subprocess.Popen([sys.executable, "-c", GREETER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())
        master = Master(node.settings(), logging.getLogger("test.master.ready"))
        master._classes = _listener_classes(port)
        master.children = {("greeter", 0, 1): Child("greeter", 0, 1, unsliced=True, proc=proc),
                           ("quiet", 0, 1): Child("quiet", 0, 1, unsliced=True, proc=None)}
        failures: list[BaseException] = []

        def wait() -> None:
            try:
                master._wait_listeners()
            except BaseException as exc:
                failures.append(exc)

        waiter = threading.Thread(target=wait)
        waiter.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        waiter.join(120)
        assert not waiter.is_alive() and not failures, failures
        # It returned because the greeter greeted: the master's QUIT reached it.
        assert proc.stdout.readline().strip() == "QUIT"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_start_up_names_the_listener_that_exited_and_its_log(node):
    import logging

    from mailq.errors import MailqError
    from mailq.master import Child, Master

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    proc.wait()
    master = Master(node.settings(), logging.getLogger("test.master.ready"))
    master._classes = _listener_classes(1)
    master.children = {("greeter", 0, 1): Child("greeter", 0, 1, unsliced=True, proc=proc)}
    with pytest.raises(MailqError) as caught:
        master._wait_listeners()
    message = str(caught.value)
    assert "the greeter runner exited (status 3) before it accepted connections on 127.0.0.1:1" in message
    assert str(node.settings().log_dir / "greeter.log") in message


@pytest.mark.parametrize("failover, other_node, rejoins", [("manual", True, False), ("auto", False, False),
                                                           ("auto", True, True)])
def test_a_restart_after_silence_waits_out_the_lease_only_when_a_takeover_can_happen(
        tmp_path, started, failover, other_node, rejoins):
    from mailq.cluster.heartbeat import lease_path, nodes_dir

    node = make_node(tmp_path, "n1", cluster={"failover": failover, "lease": 30, "margin": 30})
    if other_node:
        node.mailq("slices", "init", "--nodes", "n1,n2", check=True)
    settings = node.settings()
    beat = nodes_dir(settings) / "n1"
    beat.parent.mkdir(parents=True, exist_ok=True)
    beat.write_text("{}\n")
    os.utime(beat, (time.time() - 600, time.time() - 600))        # silent for ten minutes
    started(node)
    # The first renewal happens before `start` returns: it stamps the lease unless rejoining.
    assert lease_path(settings).exists() is not rejoins
    assert ("silent for longer than its lease" in (settings.log_dir / "master.log").read_text()) is rejoins


def test_the_init_script_follows_lsb_exit_codes(tmp_path):
    from tests.support import ROOT

    node = make_node(tmp_path, "n1")
    env = node.environ({"MAILQCTL": str(ROOT / "bin" / "mailqctl")})

    def init(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(ROOT / "etc" / "init.d" / "mailq"), action], env=env, capture_output=True,
                              text=True, timeout=180)
    try:
        assert init("status").returncode == 3          # stopped
        assert init("stop").returncode == 0            # stopping a stopped master
        assert init("start").returncode == 0
        assert init("start").returncode == 0 and "already running" in init("start").stdout
        assert init("status").returncode == 0
        assert node.settings().run_dir.is_dir()
        assert init("stop").returncode == 0
        assert init("status").returncode == 3
    finally:
        node.run("mailqctl", "stop", "--timeout", "120")


def test_after_reopen_no_process_writes_to_the_rotated_master_log(tmp_path, started):
    node = make_node(tmp_path, "n1")
    started(node)
    wait_for(lambda: runner_pid(node, "virgin"), 60, message="virgin runner running")
    log = node.settings().log_dir / "master.log"
    pids = [status(node)["pid"]] + [r["pid"] for r in status(node)["runners"] if r["pid"]]
    assert all(os.readlink(f"/proc/{pid}/fd/2") == str(log) for pid in pids)
    log.rename(log.with_name("master.log.1"))        # what logrotate does
    assert node.run("mailqctl", "reopen").returncode == 0

    def points_at_log(pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/fd/2") == str(log)
        except FileNotFoundError:
            return not pid_alive(pid)       # it exited between the look and the readlink: nothing to check

    def stderr_is_the_new_log() -> bool:
        return all(points_at_log(pid) for pid in pids)
    wait_for(stderr_is_the_new_log, 60, message="every process's stderr points at the new master.log")
    assert log.exists()


HUP_EARLY = """
import os, signal, sys
from mailq.config import load_settings
from mailq.logs import get_logger
from mailq.master import Master

settings = load_settings(sys.argv[1])
master = Master(settings, get_logger(settings, "master"))
master.acquire()                      # the pid file exists: `mailqctl reopen` may signal us now
os.kill(os.getpid(), signal.SIGHUP)   # before serve() installs its handler
print("survived", flush=True)
master._install_signals()             # the pending SIGHUP reaches the handler
print("hup seen", master._hup, flush=True)
master.release()
"""


def test_a_sighup_before_the_master_has_its_handler_waits_instead_of_killing_it(node):
    # The pid file is written before serve() installs the SIGHUP handler; a reopen in between used
    # to kill the starting master (SIGHUP's default action).
    out = subprocess.run([sys.executable, "-c", HUP_EARLY, str(node.config)], env=node.environ(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert out.stdout.splitlines() == ["survived", "hup seen True"], out.stderr
