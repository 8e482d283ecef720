"""The sliced queue: entries, slices, claims and recovery on a shared filesystem (docs/design.md §2-§3).

Nothing here knows about email or lists: an entry is raw bytes plus a metadata dict.

* :mod:`mailq.queue.names`    entry and claim names, slice math, bucket ranges (§3.1, §3.2)
* :mod:`mailq.queue.payload`  the pickled payload and the durable write (§3.3, §3.4)
* :mod:`mailq.queue.queue`    the ``Queue`` class: enqueue, claim, finish, shunt, requeue (§3.4-§3.7)
* :mod:`mailq.queue.recovery` dead claims back to the queue, stale temp files (§3.8, §3.9)
"""
from mailq.queue.names import Claimant, ClaimInfo, slice_bounds, slice_buckets, slice_of
from mailq.queue.payload import BadEntry, QueueFull
from mailq.queue.queue import Claimed, Queue

__all__ = ["BadEntry", "ClaimInfo", "Claimant", "Claimed", "Queue", "QueueFull", "slice_bounds",
           "slice_buckets", "slice_of"]
