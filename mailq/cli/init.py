"""``mailqctl init``: a new site in one command: the config file, the var tree, the host-local folders.

Run as root on an installed package it writes ``/etc/mailq/mailq.yaml`` from the commented sample
(with ``user:``, ``node.name`` and ``paths.var`` set), creates the var tree owned by the run-as user
with the modes the hosts of a cluster need (folders ``2775``: group-writable, setgid so files keep
the group), this node's ``paths.run`` folder and ``/var/lib/mailq`` for the MTA alias file, and
prints the next steps.  Safe to run again: nothing that exists is overwritten (an existing config
is read, not rewritten); folders get the owner and mode again.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import click

from mailq.cli.common import config_option, fail, handle_errors, remember_config
from mailq.config import ALL_QUEUES, DEFAULT_CONFIG, IS_CHECKOUT, ConfigError, config_path, load_settings, share_dir

#: Folders of the shared tree made by init (the rest appear as they are used).
TREE = ("", "lists", "locks", "log", "cluster", "archives", "qfiles", *(f"qfiles/{q}" for q in ALL_QUEUES))
#: Group-writable and setgid: every host's mailq user of the group can use what another host made.
TREE_MODE = 0o2775


@click.command("init", context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.option("--var", "var", metavar="PATH", help="The shared tree (paths.var; NFS in a cluster). Required "
              "for a new config of an installed package.")
@click.option("--run", "run", metavar="PATH", help="Host-local folder for paths.run (default: /run/mailq).")
@click.option("--user", "user", metavar="NAME", help="Run-as user written as `user:` (default: mailq for an "
              "installed package; in a checkout, whoever runs mailq).")
@click.option("--node", "node", metavar="NAME", help="This node's name (default: the short host name).")
@click.option("--aliases-dir", metavar="PATH", help="Folder for the MTA alias file, owned by the run-as user "
              "(default: /var/lib/mailq for an installed package, none in a checkout).")
@click.pass_context
@handle_errors
def init(ctx: click.Context, config_file: str | None, var: str | None, run: str | None, user: str | None,
         node: str | None, aliases_dir: str | None) -> None:
    """Set up this node: config file, var tree, run folder, alias folder; then print the next steps.

    Run it as root on each node (the owners need root); with a config that exists already it is
    read, not rewritten, and only the folders are made (again).  Exit 1 when the run-as user does
    not exist (create it first) or a folder cannot be made.

    \b
    Examples:
      useradd --system --user-group --home-dir /srv/mailq mailq
      mailqctl init --var /srv/mailq/var --node host1
      mailqctl -C /etc/mailq/h2.yaml init --var /srv/mailq/var --node host2 --run /run/mailq-h2
    """
    remember_config(ctx, config_file)
    path = config_path(ctx.find_root().ensure_object(dict).get("config_file")) or DEFAULT_CONFIG
    if path.exists():
        given = [f"--{name}" for name, value in (("var", var), ("run", run), ("user", user), ("node", node))
                 if value is not None]
        click.echo(f"kept the existing config {path}" + (f" ({', '.join(given)} ignored: edit it instead)"
                                                          if given else ""))
    else:
        if var is None and not IS_CHECKOUT:
            fail(f"{path} does not exist yet: give --var PATH (the shared tree, e.g. /srv/mailq/var)")
        _write_config(path, var, run, user, node)
        click.echo(f"wrote {path} (from the sample {share_dir() / 'etc' / 'mailq.yaml'}; every key is explained there)")
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        fail(str(exc))
    owner = _owner(settings.run_as)
    for sub in TREE:
        _make_dir(settings.var / sub, TREE_MODE, owner)
    _make_dir(settings.log_dir, TREE_MODE, owner)
    click.echo(f"var tree {settings.var}: {len(TREE) + 1} folders, mode {TREE_MODE:04o}"
               + (f", owned by {settings.run_as}" if owner else ""))
    from mailq.cli.ctl import prepare_run_dir

    prepare_run_dir(settings)
    click.echo(f"run folder {settings.run_dir}" + (f", owned by {settings.run_as}" if owner else ""))
    if aliases_dir is None and not IS_CHECKOUT:
        from mailq.mta.aliases import ALIAS_FILE

        aliases_dir = str(Path(ALIAS_FILE).parent)
    if aliases_dir:
        _make_dir(Path(aliases_dir), 0o755, owner)
        click.echo(f"alias folder {aliases_dir}" + (f", owned by {settings.run_as}" if owner else ""))
    _next_steps(path, aliases_dir)


def _write_config(path: Path, var: str | None, run: str | None, user: str | None, node: str | None) -> None:
    from mailq.config import parse_settings

    lines = [f"# Written by `mailqctl init` on {time.strftime('%Y-%m-%d')}; the commented keys below are",
             "# the defaults, explained (the sample config of this mailq).", ""]
    if user is not None or not IS_CHECKOUT:
        lines.append(f"user: {user or 'mailq'}")
    if node is not None:
        lines.append(f"node: {{name: {node}}}")
    paths = {k: str(Path(v).absolute()) for k, v in (("var", var), ("run", run)) if v is not None}
    if paths:
        lines.append("paths: {" + ", ".join(f"{k}: {v}" for k, v in paths.items()) + "}")
    sample = (share_dir() / "etc" / "mailq.yaml").read_text(encoding="utf-8")
    text = "\n".join(lines) + "\n\n" + sample
    try:
        parse_settings(text, str(path))      # a bad --node is refused before anything is written
    except ConfigError as exc:
        fail(str(exc))
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o644)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")


def _owner(user: str) -> tuple[int, int] | None:
    """``(uid, gid)`` to give what init makes: the run-as user's, when root; None otherwise."""
    if os.geteuid() != 0 or not user or user == "root":
        return None
    from mailq.runas import ids

    found = ids(user)
    if found is None:
        fail(f"the run-as user {user!r} (config key `user:`) does not exist: create it first "
             f"(`useradd --system --user-group --home-dir /srv/mailq {user}`), or set `user:` to an existing user")
    return found


def _make_dir(folder: Path, mode: int, owner: tuple[int, int] | None) -> None:
    try:
        folder.mkdir(mode=mode, parents=True, exist_ok=True)
        os.chmod(folder, mode)      # whatever the umask
        if owner is not None:
            os.chown(folder, *owner)
    except OSError as exc:
        fail(f"cannot make {folder}: {exc.strerror}")


def _next_steps(path: Path, aliases_dir: str | None) -> None:
    share = share_dir()
    conf = "" if path in (DEFAULT_CONFIG, Path("/etc/mailq/mailq.yaml")) else f" -C {path}"
    aliases = f"{aliases_dir}/aliases" if aliases_dir else "FILE"
    click.echo(f"""
next steps:
  1. edit {path}: smtp: (your MTA's submission port), lmtp:, lists.default_domain
  2. mailqctl{conf} lists create NAME --owner ADDRESS --domain LIST-DOMAIN
  3. hand list mail over, LMTP (recommended): {share}/etc/postfix/main.cf.lmtp and transport,
     or pipe aliases: mailqctl{conf} aliases --output {aliases} && postalias {aliases}
     ({share}/etc/postfix/main.cf.pipe; Exim, both ways: {share}/etc/exim4/README)
  4. cron: cp {share}/etc/crontab /etc/cron.d/mailq (or {share}/etc/systemd/mailq-cron.timer);
     logs: cp {share}/etc/logrotate.d/mailq /etc/logrotate.d/ (put this node's log folder in it)
  5. mailqctl{conf} start (or {share}/etc/systemd/mailq.service, {share}/etc/init.d/mailq)
  6. mailqctl{conf} check
docs: {share}/docs/operations.md, mail-flow.md""")
