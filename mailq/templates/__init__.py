"""Every text mailq mails to people, as ``string.Template`` files (docs/commands.md §5).

The texts ship in this folder as ``NAME.txt``.  A list may override any of them with its own
``var/lists/<list>/templates/NAME.txt`` (``mailqctl templates edit LIST NAME``); the override wins
for that list only.  A template may start with a ``Subject: ...`` line and an empty line: that line
is the notice's subject (``render_message``), the rest its body (``render``).

Placeholders are ``$name`` or ``${name}`` (``$$`` is a dollar sign).  Every template gets the list's
own values (``LIST_PLACEHOLDERS``: ``$list_name``, ``$list_address``, ``$request_address``,
``$owner_address``, ...); the caller adds the ones of its occasion (``$token``, ``$address``,
``$reason``, ...).  A placeholder nobody supplied is left as written rather than failing: a typo in
an operator's override must not stop a runner.  ``mailqctl templates edit`` refuses such typos
before they are saved (``check``).

It imports only mailq's basics (errors, fsutil): lists, delivery, runners and the CLI all use it.
"""
from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any

from mailq.errors import InvalidInput
from mailq.fsutil import atomic_write

#: The shipped templates.
PACKAGE_DIR = Path(__file__).resolve().parent
#: Sub-folder of a list's folder that holds its overrides.
OVERRIDE_DIR = "templates"
SUFFIX = ".txt"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

#: Placeholders every template may use, with what they hold (docs/commands.md lists them too).
LIST_PLACEHOLDERS: dict[str, str] = {
    "list_name": "the list's short name (dev)",
    "display_name": "the list's display name, or its name when it has none",
    "description": "the list's description",
    "domain": "the list's mail domain",
    "list_id": "the List-Id (dev.example.org)",
    "list_address": "the posting address (dev@example.org)",
    "request_address": "the command address (dev-request@example.org)",
    "owner_address": "the owners' address (dev-owner@example.org)",
    "join_address": "the subscribe address (dev-join@example.org)",
    "leave_address": "the unsubscribe address (dev-leave@example.org)",
    "confirm_address": "the confirmation address (dev-confirm@example.org)",
    "bounces_address": "the bounces address (dev-bounces@example.org)",
    "web_url": "the list's web page (list setting web_url; empty when not set)",
}


class TemplateError(InvalidInput):
    """An unknown template name, or a template text that would not render as meant."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TemplateError(f"{name!r} is not a template name (lower-case letters, digits, '-' and '_'; "
                            f"'mailqctl templates list LIST' shows them)")
    return name


def names() -> list[str]:
    """The shipped template names, sorted."""
    return sorted(p.name[:-len(SUFFIX)] for p in PACKAGE_DIR.glob(f"*{SUFFIX}"))


def default_path(name: str) -> Path:
    path = PACKAGE_DIR / f"{check_name(name)}{SUFFIX}"
    if not path.is_file():
        raise TemplateError(f"no template named {name!r}; known: {', '.join(names())}")
    return path


def override_path(list_folder: Path, name: str) -> Path:
    """Where a list's own copy of *name* lives (whether or not it exists)."""
    return Path(list_folder) / OVERRIDE_DIR / f"{check_name(name)}{SUFFIX}"


def _folder(mlist: Any) -> Path | None:
    return getattr(mlist, "folder", None) if mlist is not None else None


def source(mlist: Any, name: str) -> tuple[str, Path, bool]:
    """(text, path, overridden) of template *name* for *mlist* (None: the shipped text)."""
    shipped = default_path(name)
    folder = _folder(mlist)
    if folder is not None:
        own = override_path(folder, name)
        try:
            return own.read_text(encoding="utf-8"), own, True
        except FileNotFoundError:
            pass
    return shipped.read_text(encoding="utf-8"), shipped, False


def list_values(mlist: Any) -> dict[str, str]:
    """The LIST_PLACEHOLDERS values of *mlist* (all empty for None: site mail)."""
    if mlist is None:
        return dict.fromkeys(LIST_PLACEHOLDERS, "")
    return {
        "list_name": mlist.name,
        "display_name": mlist.display_name,
        "description": mlist.settings.description,
        "domain": mlist.domain,
        "list_id": mlist.list_id,
        "list_address": mlist.posting_address,
        "request_address": mlist.request_address,
        "owner_address": mlist.owner_address,
        "join_address": mlist.join_address,
        "leave_address": mlist.leave_address,
        "confirm_address": mlist.confirm_address,
        "bounces_address": mlist.bounces_address,
        "web_url": mlist.settings.web_url,
    }


def split_subject(text: str) -> tuple[str, str]:
    """(subject, body): a first line ``Subject: ...`` followed by an empty line is the subject."""
    first, sep, rest = text.partition("\n")
    if first.lower().startswith("subject:") and sep and rest.startswith(("\n", "\r\n")):
        return first[len("subject:"):].strip(), rest.lstrip("\r\n") if rest.strip() else ""
    return "", text


def _substitute(text: str, values: dict[str, Any]) -> str:
    return string.Template(text).safe_substitute({k: "" if v is None else str(v) for k, v in values.items()})


def render_message(mlist: Any, name: str, **values: Any) -> tuple[str, str]:
    """(subject, body) of template *name* for *mlist*, placeholders filled in."""
    return fill(source(mlist, name)[0], mlist, **values)


def fill(text: str, mlist: Any, **values: Any) -> tuple[str, str]:
    """(subject, body) of the template *text* with *mlist*'s values and *values* filled in."""
    merged = {**list_values(mlist), **values}
    subject, body = split_subject(text)
    # A subject is one line whatever a value holds (a header must not be split by a crafted value).
    subject = " ".join(_substitute(subject, merged).split())
    return subject, _substitute(body, merged)


def render(mlist: Any, name: str, **values: Any) -> str:
    """The body of template *name* for *mlist* (None: site mail), placeholders filled in."""
    return render_message(mlist, name, **values)[1]


def placeholders(text: str) -> set[str]:
    """The placeholder names *text* uses."""
    return set(string.Template(text).get_identifiers())


def check(name: str, text: str) -> list[str]:
    """Problems of *text* as a replacement for template *name* (empty: fine).

    A replacement may use the list placeholders and the ones the shipped text uses (those are the
    values the code that sends it supplies); anything else would be mailed out as written.
    """
    shipped = default_path(name).read_text(encoding="utf-8")
    problems = []
    if not string.Template(text).is_valid():
        problems.append("a '$' that starts no placeholder (write '$$' for a dollar sign)")
    allowed = set(LIST_PLACEHOLDERS) | placeholders(shipped)
    unknown = sorted(placeholders(text) - allowed)
    if unknown:
        problems.append(f"unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                        f"{name} knows {', '.join('$' + a for a in sorted(allowed))}")
    if split_subject(shipped)[0] and not split_subject(text)[0]:
        problems.append("the first line must stay 'Subject: ...' followed by an empty line")
    return problems


def write_override(list_folder: Path, name: str, text: str, *, mode: int = 0o660) -> Path:
    """Save *text* as the list's copy of *name* (after ``check``); TemplateError naming the problems."""
    problems = check(name, text)
    if problems:
        raise TemplateError(f"template {name} not saved: " + "; ".join(problems))
    path = override_path(list_folder, name)
    folder = path.parent
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o2775)
    atomic_write(path, text.encode("utf-8"), fsync=True, mode=mode)
    return path


def remove_override(list_folder: Path, name: str) -> bool:
    """Drop the list's copy of *name* (the shipped text applies again); False when there was none."""
    try:
        os.unlink(override_path(list_folder, name))
        return True
    except FileNotFoundError:
        return False
