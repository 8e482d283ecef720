"""Slice math and bucket ranges (docs/design.md §3.2): exact, integers only, for every slice count 1..1024.

The slice counts are not sampled: every N from 1 to 1024 is checked, every slice of it, and every
boundary with its neighbours.  Hypothesis draws the digests in between.
"""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailq.queue import slice_bounds, slice_buckets, slice_of
from mailq.queue.names import BUCKET_SHIFT, SPACE

ALL_COUNTS = range(1, 1025)
BUCKET_NAMES = [f"{b:02x}" for b in range(256)]
digests = st.integers(min_value=0, max_value=SPACE - 1)


def boundary(k: int, n: int) -> int:
    """ceil(k * 2**160 / n): the first digest of slice k, computed independently of names.py."""
    return -((-k * SPACE) // n)


def bucket_range(b: int) -> tuple[int, int]:
    return b << BUCKET_SHIFT, ((b + 1) << BUCKET_SHIFT) - 1


def test_slices_cover_the_space_without_gaps_or_overlap_for_every_count():
    for n in ALL_COUNTS:
        expected_lo = 0
        for k in range(n):
            lo, hi = slice_bounds(k, n)
            assert lo == expected_lo == boundary(k, n), (k, n)
            assert lo <= hi, (k, n)             # no slice is empty for n <= 2**160
            expected_lo = hi + 1
        assert expected_lo == SPACE, n


def test_every_boundary_and_its_neighbours_land_in_the_right_slice_for_every_count():
    for n in ALL_COUNTS:
        assert slice_of(0, n) == 0 and slice_of(SPACE - 1, n) == n - 1
        assert slice_of("0" * 40, n) == 0 and slice_of("f" * 40, n) == n - 1
        for k in range(1, n):
            b = boundary(k, n)
            assert (slice_of(b - 1, n), slice_of(b, n), slice_of(b + 1, n)) == (k - 1, k, k), (k, n)
            assert slice_of(f"{b:040x}", n) == k, (k, n)      # names give the same answer as integers


def test_bucket_lists_are_exactly_the_buckets_each_slice_can_use_for_every_count():
    for n in ALL_COUNTS:
        for k in range(n):
            lo, hi = slice_bounds(k, n)
            first, last = lo >> BUCKET_SHIFT, hi >> BUCKET_SHIFT
            listed = slice_buckets(k, n)
            # every bucket from the one holding lo to the one holding hi, in order, nothing else
            assert [b for b, _ in listed] == BUCKET_NAMES[first:last + 1], (k, n)
            # only the end buckets can be shared with a neighbour; "whole" is exact at both ends
            f_lo, f_hi = bucket_range(first)
            l_lo, l_hi = bucket_range(last)
            ends = [lo <= f_lo and f_hi <= hi, lo <= l_lo and l_hi <= hi]
            assert [w for _, w in listed] == ([ends[0] and ends[1]] if first == last else
                                              [ends[0], *[True] * (last - first - 1), ends[1]]), (k, n)
            # the digests just outside the listed buckets belong to other slices
            assert first == 0 or slice_of(f_lo - 1, n) < k, (k, n)
            assert last == 255 or slice_of(l_hi + 1, n) > k, (k, n)
        assert slice_buckets(0, n)[0][0] == "00" and slice_buckets(n - 1, n)[-1][0] == "ff", n


@given(digests)
@settings(max_examples=60, deadline=None)
def test_every_digest_falls_in_exactly_one_slice_and_its_bucket_is_listed_for_every_count(d):
    bucket = f"{d >> BUCKET_SHIFT:02x}"
    assert f"{d:040x}"[:2] == bucket
    for n in ALL_COUNTS:
        k = slice_of(d, n)
        assert 0 <= k < n
        lo, hi = slice_bounds(k, n)
        assert lo <= d <= hi
        for other in {max(k - 1, 0), min(k + 1, n - 1)} - {k}:     # bounds are sorted: neighbours suffice
            o_lo, o_hi = slice_bounds(other, n)
            assert not o_lo <= d <= o_hi
        assert bucket in dict(slice_buckets(k, n))
        assert slice_of(f"{d:040x}", n) == k
