"""Slice math and bucket ranges (docs/design.md §3.2): exact, integers only, for any slice count."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailq.queue import slice_bounds, slice_buckets, slice_of
from mailq.queue.names import BUCKET_SHIFT, SPACE

counts = st.integers(min_value=1, max_value=1024)
digests = st.integers(min_value=0, max_value=SPACE - 1)


def boundary(k: int, n: int) -> int:
    """ceil(k * 2**160 / n): the first digest of slice k."""
    return -((-k * SPACE) // n)


def special_digests(n: int) -> list[int]:
    out = {0, SPACE - 1}
    for k in range(1, n):
        b = boundary(k, n)
        out.update({b - 1, b, b + 1})
    return sorted(d for d in out if 0 <= d < SPACE)


@given(counts, digests)
@settings(max_examples=400, deadline=None)
def test_every_digest_falls_in_exactly_one_slice(n, d):
    k = slice_of(d, n)
    assert 0 <= k < n
    lo, hi = slice_bounds(k, n)
    assert lo <= d <= hi
    # and in no other slice's bounds
    for other in {max(k - 1, 0), min(k + 1, n - 1)} - {k}:
        o_lo, o_hi = slice_bounds(other, n)
        assert not o_lo <= d <= o_hi


@given(counts)
@settings(max_examples=150, deadline=None)
def test_slices_cover_the_space_without_gaps_or_overlap(n):
    expected_lo = 0
    for k in range(n):
        lo, hi = slice_bounds(k, n)
        assert lo == expected_lo == boundary(k, n)
        assert lo <= hi             # no slice is empty for n <= 2**160
        expected_lo = hi + 1
    assert expected_lo == SPACE


@given(counts)
@settings(max_examples=60, deadline=None)
def test_boundaries_and_their_neighbours_land_in_the_right_slice(n):
    for d in special_digests(n):
        k = slice_of(d, n)
        assert boundary(k, n) <= d < boundary(k + 1, n)
        assert slice_of(f"{d:040x}", n) == k            # hex names give the same answer as integers
    assert slice_of(0, n) == 0
    assert slice_of(SPACE - 1, n) == n - 1
    for k in range(1, n):
        assert slice_of(boundary(k, n), n) == k
        assert slice_of(boundary(k, n) - 1, n) == k - 1


@given(counts, digests)
@settings(max_examples=400, deadline=None)
def test_a_digest_bucket_is_always_listed_for_its_slice(n, d):
    k = slice_of(d, n)
    buckets = dict(slice_buckets(k, n))
    assert f"{d >> BUCKET_SHIFT:02x}" in buckets
    assert f"{d:040x}"[:2] == f"{d >> BUCKET_SHIFT:02x}"


@given(counts, st.data())
@settings(max_examples=150, deadline=None)
def test_bucket_list_is_exactly_the_buckets_a_slice_can_use(n, data):
    k = data.draw(st.integers(min_value=0, max_value=n - 1))
    lo, hi = slice_bounds(k, n)
    listed = slice_buckets(k, n)
    names = [b for b, _ in listed]
    # every bucket that holds at least one digest of the slice, and nothing else
    assert names == [f"{b:02x}" for b in range(lo >> BUCKET_SHIFT, (hi >> BUCKET_SHIFT) + 1)]
    for b, whole in listed:
        b_lo, b_hi = int(b, 16) << BUCKET_SHIFT, ((int(b, 16) + 1) << BUCKET_SHIFT) - 1
        assert max(b_lo, lo) <= min(b_hi, hi)               # the bucket shares a digest with the slice
        assert whole == (slice_of(b_lo, n) == k == slice_of(b_hi, n))
    # a bucket just outside the list has no digest of this slice
    first, last = int(names[0], 16), int(names[-1], 16)
    if first > 0:
        assert slice_of(((first) << BUCKET_SHIFT) - 1, n) != k
    if last < 255:
        assert slice_of((last + 1) << BUCKET_SHIFT, n) != k


def test_bucket_lists_of_neighbouring_slices_chain_from_00_to_ff():
    for n in [*range(1, 65), *range(65, 1025, 37), 255, 256, 257, 1024]:
        lists = [[int(b, 16) for b, _ in slice_buckets(k, n)] for k in range(n)]
        assert lists[0][0] == 0 and lists[-1][-1] == 255
        for prev, cur in zip(lists, lists[1:], strict=False):
            # a shared boundary bucket, or the next one: never a gap
            assert cur[0] in (prev[-1], prev[-1] + 1), n
