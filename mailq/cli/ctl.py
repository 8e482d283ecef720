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

from mailq.cli.common import (EXIT_FAIL, accept_config_everywhere, become_run_as, config_option, emit_json, fail,
                              get_settings, json_option, print_table)
from mailq.cli.main import LazyGroup
from mailq.config import Settings
from mailq.fsutil import make_dirs

#: ``status`` of a master that is not running (LSB "program is not running", as systemctl status).
EXIT_NOT_RUNNING = 3
#: How long ``start`` waits for the daemon to report (recovery of many claims can take a while).
START_TIMEOUT = 120.0


class _CtlGroup(LazyGroup):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from mailq.config import share_dir

        formatter.write_paragraph()
        formatter.write_text(f"Documentation: {share_dir() / 'docs'} (operations.md first); sample config and "
                             f"MTA recipes: {share_dir() / 'etc'}")


@click.group(cls=_CtlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.pass_context
def ctl(ctx: click.Context, config_file: str | None) -> None:
    """Administer mailq: this node's master (start, stop, status) and every admin command group.

    The master runs one runner process per queue slice the slice map gives this node (plus the LMTP
    listener), restarts crashed runners, and renews the node's heartbeat.
    Exit status: 0 done, 1 refused or failed (already running, not running,
    did not stop in time), 2 usage error.  More in docs/operations.md.

    \b
    Examples:
      mailqctl init --var /srv/mailq/var   # a new node: config, var tree, folders
      mailqctl lists create dev --owner alice@example.org
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
    settings = get_settings(ctx, stay_root=True)
    prepare_run_dir(settings)
    become_run_as(settings)
    from mailq.runstate import running_pid

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
    settings = get_settings(ctx, stay_root=True)
    prepare_run_dir(settings)
    become_run_as(settings)
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
    from mailq.runstate import running_pid

    pid = running_pid(settings)
    if pid is None:
        fail(f"the mailq master for node {settings.node.name} is not running; nothing to reopen")
    os.kill(pid, signal.SIGHUP)
    click.echo(f"asked master pid {pid} to reopen its logs")


@ctl.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the master and each runner: name, slice, pid, restarts, state.

    Exit status as LSB init scripts and systemctl use it: 0 running, 3 not running, 1 not running
    but a stale pid file is left (the master died), or an error.

    \b
    Examples:
      mailqctl status
      mailqctl status --json | jq '.runners[] | select(.state != "running")'
    """
    settings = get_settings(ctx)
    from mailq.runstate import read_pid, read_status, running_pid

    pid = running_pid(settings)
    state = read_status(settings) if pid is not None else None
    if state is not None and state.get("pid") != pid:
        state = None
    report = {"node": settings.node.name, "running": pid is not None, "pid": pid, "run_dir": str(settings.run_dir),
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
    if pid is None:     # LSB: 1 "dead and the pid file exists", 3 "not running"
        sys.exit(EXIT_FAIL if report["stale_pid"] else EXIT_NOT_RUNNING)


# -- the work behind the commands ---------------------------------------------------------------

def prepare_run_dir(settings: Settings) -> None:
    """Make this node's host-local folder (``paths.run``); as root, owned by the run-as user.

    ``/run`` is a tmpfs emptied at boot, so ``start`` (and the init script) make it every time.
    Exits 1 naming ``paths.run`` when it cannot be made.
    """
    from mailq.errors import MailqError
    from mailq.runas import ids, who

    try:
        run_dir = settings.run_dir
        base = run_dir.parent
        for folder in (base, run_dir):
            if not folder.is_dir():
                folder.mkdir(mode=0o755, parents=True, exist_ok=True)
                owner = ids(settings.run_as) if os.geteuid() == 0 else None
                if owner is not None:
                    os.chown(folder, *owner)
    except MailqError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot create paths.run folder {exc.filename or settings.paths.run}: {exc.strerror}; "
             f"create it (host-local, writable by {settings.run_as or who()}) or set "
             f"paths.run in {settings.source or 'the config file'}")


def _stop(settings: Settings, timeout: float | None) -> bool:
    """SIGTERM the master and wait until it is gone; False if it was not running."""
    from mailq.fsutil import pid_alive
    from mailq.runstate import running_pid

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
    make_dirs(settings.log_dir)     # fsutil's DIR_MODE, whatever the umask
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
    from mailq.logs import redirect_stdio

    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    redirect_stdio(str(log_file))     # the runners inherit it, and reopen it on SIGHUP as the master does


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
