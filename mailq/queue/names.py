"""Reading entry names, claim names and the slice math (docs/design.md §3.1 "Names", §3.2 "Slices and buckets").

Making a new entry's name is ``mailq.queue.entry`` (``entry_id``, ``new_sha``, ``fixed_sha``).

Everything a host needs to decide "is this file mine?" comes from the file *name*: the slice from the
SHA-1 in it, the bucket folder from its first two hex digits, the due time from its time field, the
claimant from a claim name.  No file is opened to answer those questions.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

#: Bits in a SHA-1 digest; slice math works on the digest as one 160-bit integer.
DIGEST_BITS = 160
SPACE = 1 << DIGEST_BITS
#: A bucket is named by the first two hex digits (8 bits), so it holds digests d with d >> 152 == b.
BUCKET_SHIFT = DIGEST_BITS - 8
BUCKETS = 256

CLAIM_SUFFIX = ".bak"
TEMP_SUFFIX = ".tmp"
REASON_SUFFIX = ".reason"

#: ``<time>+<sha1hex>.pck``: time is seconds since the epoch (when the entry becomes due).
ENTRY_RE = re.compile(r"(?P<time>\d{1,12}(?:\.\d{1,9})?)\+(?P<sha>[0-9a-f]{40})\.pck")
#: ``<entry>.pck.<node>.<pid>.<epoch>.bak``; the node name may itself contain dots.
CLAIM_RE = re.compile(r"(?P<id>\d{1,12}(?:\.\d{1,9})?\+[0-9a-f]{40})\.pck"
                      r"\.(?P<node>.+)\.(?P<pid>\d+)\.(?P<epoch>\d+)\.bak")
ID_RE = re.compile(r"(?P<time>\d{1,12}(?:\.\d{1,9})?)\+(?P<sha>[0-9a-f]{40})")


def split_id(eid: str) -> tuple[float, str]:
    """``(time, sha1hex)`` of an entry id; ValueError when it is not one."""
    m = ID_RE.fullmatch(eid)
    if not m:
        raise ValueError(f"not a queue entry id: {eid!r} (expected <time>+<40 hex digits>)")
    return float(m["time"]), m["sha"]


def bucket_of(sha: str) -> str:
    return sha[:2]


# -- slices ------------------------------------------------------------------------------------

def slice_of(sha: str | int, count: int) -> int:
    """The slice (0..count-1) that an entry with this SHA-1 belongs to when there are *count* slices."""
    digest = int(sha, 16) if isinstance(sha, str) else sha
    return (digest * count) >> DIGEST_BITS


def slice_bounds(index: int, count: int) -> tuple[int, int]:
    """Smallest and largest digest of slice *index* (inclusive); lo > hi means the slice is empty.

    ``(d * N) >> 160 == k``  <=>  ``k * 2**160 <= d * N < (k + 1) * 2**160``
    <=>  ``ceil(k * 2**160 / N) <= d <= ceil((k + 1) * 2**160 / N) - 1``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"slice {index} of {count} does not exist (need count >= 1 and 0 <= slice < count)")
    lo = -((-index * SPACE) // count)
    hi = -((-(index + 1) * SPACE) // count) - 1
    return lo, hi


@functools.lru_cache(maxsize=4096)
def slice_buckets(index: int, count: int) -> tuple[tuple[str, bool], ...]:
    """Buckets that can hold entries of this slice, as ``(hex, whole)``.

    *whole* is True when every digest of the bucket belongs to the slice (no per-name check needed);
    the first and last bucket may be shared with the neighbouring slices.
    """
    lo, hi = slice_bounds(index, count)
    if lo > hi:
        return ()
    first, last = lo >> BUCKET_SHIFT, hi >> BUCKET_SHIFT
    out = []
    for b in range(first, last + 1):
        b_lo, b_hi = b << BUCKET_SHIFT, ((b + 1) << BUCKET_SHIFT) - 1
        out.append((f"{b:02x}", lo <= b_lo and b_hi <= hi))
    return tuple(out)


# -- claims ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Claimant:
    """Who holds a claim: node name, process id and the slice-map epoch the claim was made under."""

    node: str
    pid: int
    epoch: int = 0

    def __post_init__(self) -> None:
        if not self.node or "/" in self.node or "\0" in self.node or self.node.startswith("."):
            raise ValueError(f"node name {self.node!r} cannot be part of a claim file name")

    def suffix(self) -> str:
        return f".{self.node}.{self.pid}.{self.epoch}{CLAIM_SUFFIX}"


@dataclass(frozen=True)
class ClaimInfo:
    """A claim file as found on disk (parsed from its name only)."""

    entry_id: str
    node: str
    pid: int
    epoch: int
    path: Path
    slice_hex: str          # the entry's SHA-1: slice_of(slice_hex, N) gives its slice for any N
    queue: str = ""

    def slice(self, count: int) -> int:
        return slice_of(self.slice_hex, count)


def parse_claim(name: str, path: Path, queue: str = "") -> ClaimInfo | None:
    m = CLAIM_RE.fullmatch(name)
    if not m:
        return None
    return ClaimInfo(entry_id=m["id"], node=m["node"], pid=int(m["pid"]), epoch=int(m["epoch"]),
                     path=path, slice_hex=m["id"].rsplit("+", 1)[1], queue=queue)
