"""Helpers every CLI module shares: settings from -C/--config, JSON output, errors and exit codes.

Exit codes a shell script can trust (also in docs/cli.md):

* 0  success
* 1  the command ran but refused or found a problem (``slices check`` with gaps, ``locks break``
     on a live holder, an unknown list or entry, invalid input that changed nothing)
* 2  usage error (click's own: unknown option, missing argument)
* 75 temporary failure: a lock could not be taken in time, the disk is full; run it again later
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, NoReturn
from collections.abc import Callable

import click

from mailq.config import ConfigError, Settings, load_settings

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75

CONFIG_HELP = "Config file (default: $MAILQ_CONFIG, else etc/mailq.yaml in the checkout, else built-in defaults)."
# No envvar here: load_settings() falls back to $MAILQ_CONFIG itself, so a -C typed on the command
# line always wins over the environment.  Groups take it as ``config_file``; every other command
# gets its own -C from accept_config_everywhere(), so `mailqctl -C F queue count`, `mailqctl queue -C F
# count` and `mailqctl queue count -C F` all work (the last one typed wins).
config_option = click.option("-C", "--config", "config_file", metavar="FILE", help=CONFIG_HELP)


def remember_config(ctx: click.Context, config_file: str | None, param: str = "config_file") -> None:
    """Store a -C typed on a group or command where get_settings() looks (the root context).

    Only a -C typed there counts (not a default), so it never overrides a -C given before it.
    """
    from click.core import ParameterSource

    if config_file and ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
        ctx.find_root().ensure_object(dict)["config_file"] = config_file


def _remember_config(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    remember_config(ctx, value, param.name or "leaf_config")


def accept_config_everywhere(cmd: click.Command) -> click.Command:
    """Give *cmd* and every command under it a -C/--config of its own, unless it has one already.

    The option stores the file where get_settings() looks (the root context), so a command body
    never sees it.  Idempotent: the lazy ``mailqctl`` groups call it on every lookup.
    """
    if not any("-C" in p.opts for p in cmd.params):
        cmd.params.append(click.Option(["-C", "--config", "leaf_config"], metavar="FILE", expose_value=False,
                                       callback=_remember_config, help=CONFIG_HELP))
    for sub in getattr(cmd, "commands", {}).values():
        accept_config_everywhere(sub)
    return cmd
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """Print *message* to stderr as ``mailqctl: error: ...`` and exit with *code*."""
    click.echo(f"{_prog()}: error: {message}", err=True)
    sys.exit(code)


def warn(message: str) -> None:
    click.echo(f"{_prog()}: warning: {message}", err=True)


def _prog() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().info_name if ctx and ctx.find_root().info_name else "mailqctl"


def get_settings(ctx: click.Context | None = None, *, stay_root: bool = False) -> Settings:
    """The settings for this invocation, loaded once from the root command's -C/--config.

    Started as root, the process then switches to the run-as user (``user:``, mailq/runas.py)
    before the command touches anything, or exits 1 saying how to run it.  *stay_root* is for the
    few commands that need root first (``init``, ``check --fix``, ``start`` making ``paths.run``):
    they call :func:`become_run_as` themselves once that part is done.
    """
    ctx = ctx or click.get_current_context()
    root = ctx.find_root()
    obj = root.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config_file"))
        except ConfigError as exc:
            fail(str(exc))
    if not stay_root:
        become_run_as(obj["settings"])
    return obj["settings"]


def become_run_as(settings: Settings) -> None:
    """As root, switch to the run-as user now (no-op otherwise); exit 1 with the reason if impossible."""
    from mailq.runas import RunAsError, become

    ctx = click.get_current_context(silent=True)
    what = " ".join(c.info_name for c in _chain(ctx)) if ctx else _prog()
    try:
        become(settings.run_as, f"`{what}`")
    except RunAsError as exc:
        fail(str(exc))


def _chain(ctx: click.Context) -> list[click.Context]:
    out = []
    while ctx is not None:
        if ctx.info_name:
            out.append(ctx)
        ctx = ctx.parent
    return out[::-1]


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_table(rows: list[list[Any]], headers: list[str]) -> None:
    """A plain left-aligned table; empty rows print just the headers."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn mailq's own exceptions into one-line errors with the right exit code.

    Lock timeouts and full disks are temporary (75); everything else that is a known mailq error is 1,
    and so is a permission error (one line naming the file).  Unknown exceptions are left alone so
    that a real bug still shows its traceback.
    """
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mailq.errors import MailqError, TemporaryFailure

        try:
            return func(*args, **kwargs)
        except TemporaryFailure as exc:
            fail(str(exc), EXIT_TEMPFAIL)
        except MailqError as exc:
            fail(str(exc), EXIT_FAIL)
        except PermissionError as exc:
            # Common on a shared tree: the command runs as another user than the one owning var/.
            fail(f"permission denied: {exc.filename or exc}: run mailqctl as the user (or group) that owns "
                 f"the var tree (config key `user:`), or see `mailqctl check` for the owners and modes it "
                 f"expects", EXIT_FAIL)
    return wrapper


def progress(iterable: Any, length: int | None = None, label: str = "") -> Any:
    """A progress bar on a terminal, nothing in scripts (stderr not a tty)."""
    if sys.stderr.isatty():
        return click.progressbar(iterable, length=length, label=label, file=sys.stderr)
    return _Quiet(iterable)


class _Quiet:
    def __init__(self, iterable: Any) -> None:
        self.iterable = iterable

    def __enter__(self) -> Any:
        return self.iterable

    def __exit__(self, *exc: Any) -> None:
        return None
