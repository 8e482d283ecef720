"""Post numbers: one counter per list, each accepted post numbered once across hosts and retries.

``var/lists/<name>/posts.json`` holds ``{"next": N, "recent": [[key, number], ...]}`` and is changed
only under ``var/locks/posts.<name>.lock`` (temp file, fsync, rename).  It lives next to the list
database rather than inside ``list.pck`` on purpose: a post is numbered on the hot path, and saving
``list.pck`` rewrites the whole roster (about 30 ms at 100,000 members) and makes every runner
reload it; this file is a few kilobytes and its lock is taken by nothing else.

``take(settings, list, key)`` gives the next number to the post whose queue entry is *key* (the
SHA-1 of the ``in`` entry, the same on every attempt).  The last ``RECENT`` keys are remembered with
their numbers, so a post whose runner was killed after taking its number (recovery replays the
entry from the start) gets the same number again instead of a new one: numbers stay consecutive.
A requeued post also carries its number in the entry's metadata (``post_number``), read first.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mailq.config import Settings
from mailq.errors import MailqError
from mailq.fsutil import atomic_write
from mailq.locks import named_lock

FILE_NAME = "posts.json"
#: How many (entry, number) pairs are remembered for replays after a crash.
RECENT = 500


def path_for(settings: Settings, listname: str) -> Path:
    return settings.lists_dir / listname / FILE_NAME


def _read(path: Path, listname: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {"next": 1, "recent": []}
    except (OSError, ValueError) as exc:
        raise MailqError(f"list {listname}: cannot read its post counter {path} ({exc}); fix it by hand "
                         f'(e.g. {{"next": 1234, "recent": []}}) so that numbers do not repeat') from None
    if not isinstance(data, dict) or not isinstance(data.get("next"), int) or data["next"] < 1:
        raise MailqError(f"list {listname}: {path} has no valid 'next' number; fix it by hand")
    recent = data.get("recent")
    data["recent"] = [r for r in recent if isinstance(r, list) and len(r) == 2] if isinstance(recent, list) else []
    return data


def next_number(settings: Settings, listname: str) -> int:
    """The number the next accepted post will get (read without the lock)."""
    return int(_read(path_for(settings, listname), listname)["next"])


def take(settings: Settings, listname: str, key: str | None) -> int:
    """The post number of the post queued as *key*: the one it got before, or the next one."""
    return take_many(settings, listname, [key])[0]


def take_many(settings: Settings, listname: str, keys: list[str | None]) -> list[int]:
    """The post numbers of the posts queued as *keys*, in order, in ONE lock cycle and one write.

    A key this list numbered before gets its number again; the others get the next numbers, in
    the order given.  The ``in`` runner numbers a whole batch of accepted posts this way
    (``mailq.runners.incoming``), so the lock and the fsyncs are paid once per batch.
    """
    path = path_for(settings, listname)
    with named_lock(settings, f"posts.{listname}"):
        data = _read(path, listname)
        known = {k: n for k, n in data["recent"] if isinstance(k, str) and isinstance(n, int)}
        numbers: list[int] = []
        fresh: list[list[Any]] = []
        first_new = data["next"]
        for key in keys:
            if key and key in known:
                numbers.append(known[key])
                continue
            number = data["next"]
            data["next"] = number + 1
            numbers.append(number)
            if key:
                known[key] = number
                fresh.append([key, number])
        if data["next"] != first_new:      # some number was given out now: write the counter
            # every key of this call is remembered, however large the batch (a replay must find it)
            data["recent"] = [*data["recent"], *fresh][-max(RECENT, len(fresh)):]
            atomic_write(path, json.dumps(data, separators=(",", ":")).encode(), fsync=settings.queue.fsync)
        return numbers
