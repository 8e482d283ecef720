"""Held posts: stored per list, decided exactly once across processes and hosts (docs/pipeline.md "Held messages").

Layout, in ``var/lists/<name>/held/``::

    <id>.pck        the held post: safepickle of {id, msg, metadata, reason, sender, subject, date, held_at}
    <id>.decision   who decided what, when (JSON); its existence IS the decision

**Deciding once.**  A decision is a hard link, not a lock with a read-check-write: the decider writes
its record to a file with a name unique to it, then ``link()``s that file to ``<id>.decision``.
``link`` to an existing name fails with EEXIST on every POSIX filesystem including NFS, so exactly
one decider wins however many processes on however many hosts try at the same moment.  NFS may
report a failure (even EEXIST) for a link that did happen (a retransmitted request after a lost
reply); so after any failure the decider checks its own file's link count: 2 means the link
exists and the decision is its own.
This is the same trick flufl.lock and filelock's strict locks rely on.  The loser reads the
winning record and raises ``AlreadyDecided`` naming who decided and when.

**Carrying it out once.**  The winner then carries the decision out (approve: the post back into
the ``in`` queue with ``metadata["approved"] = True``; reject: a notice to the poster through
``virgin``; discard: nothing), under the lock ``var/locks/held.<list>.lock`` so two completers
never interleave, in three steps of one atomic file operation each:

1. **stage**: write the queue entry the decision sends as ``<id>.to-<queue>`` (temp, fsync,
   rename) next to the post.  Repeatable: it is rewritten only while ``<id>.pck`` exists;
2. **unhold**: unlink ``<id>.pck``.  From here on the staged entry is never written again;
3. **send**: ``rename()`` ``<id>.to-<queue>`` into ``qfiles/<queue>/<bb>/<eid>.pck``, ``eid`` a
   function of the list, the id, the queue and the decision time.  A rename of one source
   succeeds once, so the entry can only ever be queued once.

What is on disk says which step comes next: ``.pck`` -> from 1; no ``.pck`` but ``.to-*`` -> 3;
neither -> done.  A completer killed anywhere leaves one of those states and ``complete()`` (run by
``expire-held`` for decisions older than five minutes) resumes from it: no state can lead to a
second entry, and none loses the post (docs/pipeline.md has the crash analysis).

The package: ``store.py`` (the post on disk, reading), ``decide.py`` (deciding once),
``complete.py`` (carrying it out once), ``notices.py`` (moderator notice, acknowledgement,
rejection), ``expiry.py`` (the cron task ``expire-held``), ``records.py`` (the decision record).
"""
from mailq.lists.held.expiry import expire_held, prune_decisions
from mailq.lists.held.notices import notify_held, notify_rejected, rejection_notice
from mailq.lists.held.records import ACTIONS, FAULT_CRASH_ENV, AlreadyDecided, Decision
from mailq.lists.held.store import HeldStore

__all__ = ["ACTIONS", "FAULT_CRASH_ENV", "AlreadyDecided", "Decision", "HeldStore", "expire_held", "notify_held",
           "notify_rejected", "prune_decisions", "rejection_notice"]
