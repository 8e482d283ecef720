"""``qrunner``: run one queue runner in the foreground (debugging, cron, and how the master starts them).

``qrunner -r out:1:4`` serves slice 1 of 4 of the ``out`` queue until SIGTERM; ``--once`` processes
what is due now and exits (refused for an unsliced runner such as ``lmtp``, which serves a socket:
usage error, exit 2).  Each runner process stops by itself when its master is gone
(``mailq.runners.process``).
The runner names are ``mailq.runners.REGISTRY``.
"""
from __future__ import annotations

import signal
import sys

import click

from mailq.cli.common import config_option, get_settings


def parse_spec(spec: str) -> tuple[str, int, int]:
    """``NAME`` or ``NAME:SLICE:COUNT`` -> (name, slice, count); ValueError says what is wrong."""
    from mailq.runners import REGISTRY

    valid = ", ".join(sorted(REGISTRY))
    parts = spec.split(":")
    if len(parts) not in (1, 3):
        raise ValueError(f"{spec!r}: expected NAME or NAME:SLICE:COUNT (valid names: {valid})")
    name = parts[0]
    if name not in REGISTRY:
        raise ValueError(f"no runner named {name!r}; valid names: {valid}")
    if len(parts) == 1:
        return name, 0, 1
    try:
        slice_, count = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"{spec!r}: SLICE and COUNT must be whole numbers (valid names: {valid})")
    if count < 1 or not 0 <= slice_ < count:
        raise ValueError(f"{spec!r}: need 0 <= SLICE < COUNT (valid names: {valid})")
    return name, slice_, count


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("-r", "--runner", "spec", required=True, metavar="NAME[:SLICE:COUNT]",
              help="The runner and slice to serve (default slice 0 of 1).")
@click.option("--once", is_flag=True, help="Process every entry due now in the slice, then exit (not for lmtp).")
@click.option("-v", "--verbose", is_flag=True, help="Also print the log lines on stderr.")
@click.pass_context
def qrunner(ctx: click.Context, config_file: str | None, spec: str, once: bool, verbose: bool) -> None:
    """Run one mailq queue runner in the foreground until SIGTERM (or, with --once, until idle).

    Runner names: each queue that has a runner (in, out, virgin, retry, archive, ...) and lmtp
    (the LMTP listener, one per node, not sliced).
    SIGTERM/SIGINT finish the entry in hand and exit 0; SIGHUP reopens the log files.
    The log is var/log/<node>/<name>.log.

    \b
    Examples:
      qrunner -r out                 # slice 0 of 1 of the out queue
      qrunner -r out:1:4 -v          # slice 1 of 4, log lines also on stderr
      qrunner -r retry --once        # cron: move what is due, then exit
    """
    ctx.ensure_object(dict)["config_file"] = config_file
    try:
        name, slice_, count = parse_spec(spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="-r/--runner")
    settings = get_settings(ctx)
    from mailq.runners import load_runner

    cls = load_runner(name)
    if cls.unsliced and count != 1:
        raise click.BadParameter(f"the {name} runner is not sliced; use -r {name}", param_hint="-r/--runner")
    if cls.unsliced and once:
        # A listener has no "everything due now" to finish; serving until SIGTERM would silently
        # ignore --once and hang a cron job.
        raise click.UsageError(f"--once does not apply to the {name} runner (it serves a socket, not a "
                               f"queue); run `qrunner -r {name}` and stop it with SIGTERM")
    runner = cls(settings, slice_, count)
    if verbose:
        import logging

        from mailq.logs import formatter

        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(formatter())
        for flt in runner.log.handlers[0].filters:
            err.addFilter(flt)
        runner.log.addHandler(err)
    status = runner.run(once=True) if once else runner.run()
    sys.exit(status or 0)


def main() -> None:
    # Until Runner.run() installs its handler, a SIGHUP (the master passing on `mailqctl reopen`)
    # waits, blocked, instead of killing a runner that is still starting; run() unblocks it. Not a
    # handler that reopens from here: it could run in the middle of an import of mailq.logs.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    qrunner(prog_name="qrunner")


if __name__ == "__main__":
    main()
