"""No list setting that does nothing (issue 15): every ``ListSettings`` field is read by some code
other than the settings module itself and the CLI that displays settings.

A field counts as read where the source (parsed, not grepped) loads it as an attribute
(``mlist.settings.footer``), names it in ``getattr(obj, "footer", ...)``, or passes its name as an
argument (``render(mlist, "digest_header")``, which reads the setting of that name).
"""
from __future__ import annotations

import ast
from pathlib import Path

from mailq.lists.settings import ListSettings

ROOT = Path(__file__).resolve().parent.parent
#: Where reading a field does not count: the dataclass and the commands that only display settings.
NOT_USES = {"mailq/lists/settings.py", "mailq/cli/lists.py"}
#: Fields whose effect another open issue is building right now (field -> who).  An entry must go
#: as soon as the field is read: the test fails then too, naming it.
PENDING: dict[str, str] = {}


def _reads() -> dict[str, list[str]]:
    """name -> ["path:line", ...] for every attribute load, getattr name and string argument."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "mailq").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in NOT_USES:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
            names: list[str] = []
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.append(node.attr)
            elif isinstance(node, ast.Call):
                names.extend(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
            for name in names:
                found.setdefault(name, []).append(f"{rel}:{node.lineno}")
    return found


def test_every_list_setting_is_read_by_code_that_acts_on_it():
    reads = _reads()
    unused = [key for key in ListSettings.keys() if key not in reads and key not in PENDING]
    assert not unused, "\n".join(
        f"ListSettings.{key} is read by no code outside {' and '.join(sorted(NOT_USES))}: a setting that does "
        f"nothing. Read it where it takes effect (mlist.settings.{key} in the pipeline stage, runner, cron task "
        f"or command that the setting is meant to change; docs/lists.md lists what each setting does), or "
        f"remove the field from mailq/lists/settings.py (stored lists drop unknown keys when loaded). If the "
        f"code that reads it is being built in another open issue, add it to PENDING in {Path(__file__).name} "
        f"naming that issue." for key in unused)


def test_pending_settings_leave_the_list_once_something_reads_them():
    reads = _reads()
    done = {key: reads[key][:3] for key in PENDING if key in reads}
    assert not done, "\n".join(f"ListSettings.{key} is read now ({', '.join(where)}): remove it from PENDING in "
                               f"{Path(__file__).name}" for key, where in done.items())
    stale = [key for key in PENDING if key not in ListSettings.keys()]
    assert not stale, f"PENDING names settings that no longer exist: {stale}; remove them"
