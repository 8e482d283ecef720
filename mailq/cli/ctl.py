"""``mailqctl``: start, stop and inspect this node's master (one per node; see mailq/master.py).

``start`` daemonizes (double fork, setsid, stdio to ``var/log/<node>/master.log``) and returns only
once the master has written its pid file and started its runners, or says why it could not start.
The daemon reports back through a pipe, so the exit status of ``start`` is the truth.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from mailq.cli.common import (EXIT_FAIL, accept_config_everywhere, config_option, emit_json, fail, get_settings,
                              json_option, print_table)
from mailq.cli.main import LazyGroup
from mailq.config import Settings

#: How long ``start`` waits for the daemon to report (recovery of many claims can take a while).
START_TIMEOUT = 120.0


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def ctl(ctx: click.Context, config_file: str | None) -> None:
    """Start, stop and inspect the mailq master of this node.

    The master runs one runner process per queue slice the slice map gives this node (plus the LMTP
    listener), restarts crashed runners, and renews the node's heartbeat.
    Exit status: 0 done, 1 refused or failed (already running, not running,
    did not stop in time), 2 usage error.  More in docs/operations.md.

    \b
    Examples:
      mailqctl start                 # daemonize; returns once the master is up
      mailqctl status                # the master and each runner
      mailqctl reopen                # after logrotate moved the logs
      mailqctl -C /etc/mailq/h2.yaml stop
    """
    ctx.ensure_object(dict)["config_file"] = config_file


@ctl.command()
@click.option("--foreground", is_flag=True, help="Stay in the foreground; log lines also on stderr.")
@click.pass_context
def start(ctx: click.Context, foreground: bool) -> None:
    """Start the master of this node (refused if one is running already).

    \b
    Examples:
      mailqctl start
      mailqctl start --foreground    # for systemd Type=simple, or to watch it work
    """
    settings = get_settings(ctx)
    from mailq.master import running_pid

    pid = running_pid(settings)
    if pid is not None:
        fail(f"the mailq master for node {settings.node.name} is already running (pid {pid})", EXIT_FAIL)
    if foreground:
        sys.exit(_run_master(settings, None, foreground=True))
    _daemonize(settings)


def _timeout_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                        help="How long to wait for the master to exit (default: runners.stop_timeout + 15)."
                        )(func)


@ctl.command()
@_timeout_option
@click.pass_context
def stop(ctx: click.Context, timeout: float | None) -> None:
    """Stop the master: its runners finish the entry in hand and exit, then the master exits.

    Stopping a master that is not running is not an error.

    \b
    Examples:
      mailqctl stop
      mailqctl stop --timeout 120
    """
    settings = get_settings(ctx)
    if not _stop(settings, timeout):
        click.echo(f"mailq master for node {settings.node.name} is not running")


@ctl.command()
@_timeout_option
@click.pass_context
def restart(ctx: click.Context, timeout: float | None) -> None:
    """Stop the master (if running) and start it again.

    If the old master does not exit within the timeout, nothing is started and the exit status
    is 1 (as for `stop`).

    \b
    Examples:
      mailqctl restart
      mailqctl restart --timeout 120
    """
    settings = get_settings(ctx)
    _stop(settings, timeout)
    _daemonize(settings)


@ctl.command()
@click.pass_context
def reopen(ctx: click.Context) -> None:
    """Reopen every log file of the master and its runners (SIGHUP), e.g. after logrotate.

    \b
    Examples:
      mailqctl reopen
    """
    settings = get_settings(ctx)
    from mailq.master import running_pid

    pid = running_pid(settings)
    if pid is None:
        fail(f"the mailq master for node {settings.node.name} is not running; nothing to reopen")
    os.kill(pid, signal.SIGHUP)
    click.echo(f"asked master pid {pid} to reopen its logs")


@ctl.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the master and each runner: name, slice, pid, restarts, state.  Exit 1 when not running.

    \b
    Examples:
      mailqctl status
      mailqctl status --json | jq '.runners[] | select(.state != "running")'
    """
    settings = get_settings(ctx)
    from mailq.master import read_pid, read_status, running_pid

    pid = running_pid(settings)
    state = read_status(settings) if pid is not None else None
    if state is not None and state.get("pid") != pid:
        state = None
    report = {"node": settings.node.name, "running": pid is not None, "pid": pid,
              "stale_pid": read_pid(settings) if pid is None else None,
              "epoch": (state or {}).get("epoch"), "map_problem": (state or {}).get("map_problem", ""),
              "started": (state or {}).get("started"), "runners": (state or {}).get("runners", [])}
    if as_json:
        emit_json(report)
    elif pid is None:
        stale = f" (stale pid file of pid {report['stale_pid']})" if report["stale_pid"] else ""
        click.echo(f"mailq master for node {settings.node.name}: not running{stale}")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(report["started"])) if report["started"] else "?"
        epoch = f", slice map epoch {report['epoch']}" if report["epoch"] is not None else ", no slice map"
        click.echo(f"mailq master for node {settings.node.name}: running, pid {pid}, since {since}{epoch}")
        if report["map_problem"]:
            click.echo(f"slice map problem: {report['map_problem']}")
        rows = [[r["name"], "-" if r.get("unsliced") else f"{r['slice']}/{r['count']}", r["pid"] or "-",
                 r["restarts"], r["state"]] for r in report["runners"]]
        print_table(rows, ["RUNNER", "SLICE", "PID", "RESTARTS", "STATE"])
    if pid is None:
        sys.exit(EXIT_FAIL)


# -- the work behind the commands ---------------------------------------------------------------

def _stop(settings: Settings, timeout: float | None) -> bool:
    """SIGTERM the master and wait until it is gone; False if it was not running."""
    from mailq.fsutil import pid_alive
    from mailq.master import running_pid

    pid = running_pid(settings)
    if pid is None:
        return False
    wait = timeout if timeout is not None else settings.runners.stop_timeout + 15
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait
    while pid_alive(pid):
        if time.monotonic() > deadline:
            fail(f"master pid {pid} of node {settings.node.name} is still running {wait:.0f}s after SIGTERM; "
                 f"see var/log/{settings.node.name}/master.log, or `kill -9 {pid}` as a last resort")
        time.sleep(0.05)
    click.echo(f"stopped mailq master for node {settings.node.name} (pid {pid})")
    return True


def _daemonize(settings: Settings) -> None:
    """Double fork; the parent waits on a pipe for "ok PID" or "error MESSAGE" from the daemon."""
    log_file = settings.log_dir / "master.log"
    os.makedirs(settings.log_dir, exist_ok=True)
    if settings.source is not None:
        # The daemon runs in "/": its runners get the config by absolute path.
        settings.source = settings.source.resolve()
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    first = os.fork()
    if first == 0:
        os.close(read_fd)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        code = 1
        try:
            os.chdir("/")
            _redirect_stdio(log_file)
            code = _run_master(settings, write_fd, foreground=False)
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(first, 0)
    message = b""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        message += chunk
    os.close(read_fd)
    text = message.decode("utf-8", "replace").strip()
    if text.startswith("ok "):
        click.echo(f"started mailq master for node {settings.node.name} (pid {text[3:]})")
        return
    if text.startswith("error "):
        fail(text[6:])
    fail(f"the mailq master for node {settings.node.name} did not come up; see {log_file}")


def _redirect_stdio(log_file: Any) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


def _run_master(settings: Settings, report_fd: int | None, *, foreground: bool) -> int:
    """Lock, pid file, serve.  *report_fd* gets "ok PID" once up or "error ..." (daemon mode)."""
    from mailq.logs import get_logger
    from mailq.master import Master

    def report(text: str) -> None:
        nonlocal report_fd
        if report_fd is not None:
            os.write(report_fd, text.encode("utf-8", "replace"))
            os.close(report_fd)
            report_fd = None

    log = get_logger(settings, "master", stderr=foreground)
    master = Master(settings, log)
    if not foreground:
        master.on_hup = lambda: _redirect_stdio(settings.log_dir / "master.log")
    try:
        master.acquire()
    except Exception as exc:
        log.error("%s", exc)
        report(f"error {exc}")
        if foreground:
            click.echo(f"mailqctl: error: {exc}", err=True)
        return 1

    def ready() -> None:
        report(f"ok {os.getpid()}")
        if foreground:
            click.echo(f"mailq master for node {settings.node.name} running (pid {os.getpid()}); "
                       "Ctrl-C or SIGTERM stops it", err=True)

    try:
        return master.serve(ready)
    except Exception as exc:
        import traceback

        log.critical("master failed: %s\n%s", exc, traceback.format_exc().rstrip())
        report(f"error master failed at start-up: {exc} (details in {settings.log_dir / 'master.log'})")
        return 1


def main() -> None:
    from mailq.errors import MailqError

    accept_config_everywhere(ctl)   # -C after the subcommand too (`mailqctl start -C FILE`)
    try:
        ctl(prog_name="mailqctl")
    except MailqError as exc:   # e.g. no usable host-local folder for paths.run (mailq.config.host_local_run)
        click.echo(f"mailqctl: error: {exc}", err=True)
        sys.exit(EXIT_FAIL)


if __name__ == "__main__":
    main()
