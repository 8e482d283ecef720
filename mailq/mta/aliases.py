"""Alias lines that pipe every list address into ``mailq-deliver`` (docs/mail-flow.md "Aliases").

Each list gets seven aliases, one per kind (``mailq.addresses``)::

    dev:          "|/srv/mailq/bin/mailq-deliver post dev"
    dev-owner:    "|/srv/mailq/bin/mailq-deliver owner dev"
    ...

Formats: ``postfix`` and ``sendmail`` (aliases(5) files, run ``postalias``/``newaliases``), and
``exim`` (an lsearch file for a redirect router). A list exists iff ``var/lists/<name>/list.pck``
exists, so this needs no list database code.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mailq.config import CHECKOUT, DEFAULT_CONFIG, Settings
from mailq.addresses import KINDS, list_address

FORMATS = ("postfix", "sendmail", "exim")
#: Where the documented MTA recipes keep the alias file: host-local, in a folder of the mailq user.
ALIAS_FILE = "/var/lib/mailq/aliases"


@dataclass(frozen=True)
class Alias:
    listname: str
    kind: str
    local_part: str
    command: str


def deliver_path() -> str:
    """Absolute path of the ``mailq-deliver`` program the MTA should run."""
    checkout_bin = CHECKOUT / "bin" / "mailq-deliver"
    if checkout_bin.exists():
        return str(checkout_bin.resolve())
    beside = Path(sys.executable).parent / "mailq-deliver"  # installed console script in a venv
    if beside.exists():
        return str(beside)
    return shutil.which("mailq-deliver") or str(checkout_bin)


def deliver_command(settings: Settings, program: str | None = None) -> str:
    """How the MTA should run mailq-deliver: the program, plus ``-C CONFIG`` unless it is the default.

    The MTA cannot pass MAILQ_CONFIG per alias, so a config outside the checkout's ``etc/`` is named.
    """
    command = program or deliver_path()
    source = settings.source
    if source is not None and Path(source).resolve() != DEFAULT_CONFIG.resolve():
        command += f" -C {Path(source).resolve()}"
    return command


def list_names(settings: Settings) -> list[str]:
    """Every list, by the one rule that defines existence (``lists/<name>/list.pck``)."""
    try:
        entries = os.listdir(settings.lists_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in entries if not n.startswith(".")
                  and (settings.lists_dir / n / "list.pck").exists())


def aliases_for(listnames: list[str], program: str) -> list[Alias]:
    return [Alias(name, kind, list_address(name, kind), f"{program} {kind} {name}")
            for name in listnames for kind in KINDS]


def render(aliases: list[Alias], fmt: str, program: str) -> str:
    """The alias file text in *fmt*, with a header comment saying where it goes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown alias format {fmt!r}; choose one of {', '.join(FORMATS)}")
    width = max((len(a.local_part) for a in aliases), default=0) + 2
    if fmt == "exim":
        header = [
            f"# mailq list aliases for Exim: mailqctl aliases --format exim --output {ALIAS_FILE}",
            "# read per message by the redirect router in etc/exim4/mailq-router-pipe (it runs these pipes as",
            "# the mailq user) with the transport in etc/exim4/mailq-transport-pipe; etc/exim4/README says where",
            "# each file goes.",
        ]
        lines = [f"{(a.local_part + ':').ljust(width)}|{a.command}" for a in aliases]
    else:
        if fmt == "postfix":
            header = ["# mailq list aliases (postfix), tried against Postfix 3.7 (see etc/postfix/main.cf.pipe):",
                      f"#   mailqctl aliases --output {ALIAS_FILE} && postalias {ALIAS_FILE}",
                      f"#   main.cf: alias_maps = hash:/etc/aliases, hash:{ALIAS_FILE}",
                      "# The file, its .db and their folder belong to the mailq user: postalias works as the",
                      "# file's owner, and local(8) runs these pipes as the owner of the .db (not as nobody)."]
        else:
            header = ["# mailq list aliases (sendmail): append to /etc/mail/aliases, then run newaliases",
                      f"#   sendmail's smrsh must allow the program: ln -s {program} /etc/smrsh/"]
        lines = [f'{(a.local_part + ":").ljust(width)}"|{a.command}"' for a in aliases]
    if not aliases:
        lines = ["# (no lists yet: create one with 'mailqctl lists create NAME --owner ADDRESS')"]
    return "\n".join(header + lines) + "\n"
