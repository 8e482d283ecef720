"""The sliced queue: entries, slices, claims and recovery on a shared filesystem (docs/design.md §2-§3).

Nothing here knows about email or lists: an entry is raw bytes plus a metadata dict.

* :mod:`mailq.queue.entry`    writing an entry: name, payload bytes, durable write (§3.1, §3.3, §3.4)
* :mod:`mailq.queue.names`    reading entry and claim names, slice math, bucket ranges (§3.1, §3.2)
* :mod:`mailq.queue.payload`  reading a payload back through the restricted unpickler (§3.3)
* :mod:`mailq.queue.queue`    the ``Queue`` class: enqueue, claim, finish, shunt, requeue (§3.4-§3.7)
* :mod:`mailq.queue.recovery` dead claims back to the queue, stale temp files (§3.8, §3.9)
* :mod:`mailq.queue.progress` the progress side-file of a claimed entry (§3.11)

The names below are loaded on first use (PEP 562): ``mailq-deliver`` imports ``mailq.queue.entry``
for every message and must not pay for ``queue.py`` (dataclasses, pathlib, logging, re).
"""
TYPE_CHECKING = False      # not typing's: importing typing costs mailq-deliver a few ms (it imports re)
if TYPE_CHECKING:
    from typing import Any

    from mailq.queue.entry import QueueFull
    from mailq.queue.names import Claimant, ClaimInfo, slice_bounds, slice_buckets, slice_of
    from mailq.queue.payload import BadEntry
    from mailq.queue.queue import Claimed, Queue

_LAZY = {
    "Claimant": "mailq.queue.names", "ClaimInfo": "mailq.queue.names", "slice_bounds": "mailq.queue.names",
    "slice_buckets": "mailq.queue.names", "slice_of": "mailq.queue.names",
    "BadEntry": "mailq.queue.payload", "QueueFull": "mailq.queue.entry",
    "Claimed": "mailq.queue.queue", "Queue": "mailq.queue.queue",
}
__all__ = ["BadEntry", "ClaimInfo", "Claimant", "Claimed", "Queue", "QueueFull", "slice_bounds",
           "slice_buckets", "slice_of"]


def __getattr__(name: str) -> "Any":
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'mailq.queue' has no attribute {name!r}") from None
    value = getattr(__import__(module, fromlist=[name]), name)
    globals()[name] = value
    return value
