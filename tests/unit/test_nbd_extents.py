"""Merging block-status contexts and planning copy operations: pure logic, plain lists."""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import (
    CONTEXT_ALLOCATION as ALLOC,
    CONTEXT_ALLOCATION_DEPTH as DEPTH,
    COPY,
    ZERO,
    Extent,
    clip,
    count_bytes,
    merge_extents,
    plan_operations,
)

BITMAP = "qemu:dirty-bitmap:fb-x"


def test_contexts_with_different_boundaries_are_cut_at_every_boundary():
    replies = {
        ALLOC: [(4096, 0), (8192, 3)],
        BITMAP: [(2048, 1), (6144, 0), (4096, 1)],
    }
    assert merge_extents(0, replies, BITMAP) == [
        Extent(0, 2048, False, True, True),
        Extent(2048, 2048, False, False, True),
        Extent(4096, 4096, True, False, True),
        Extent(8192, 4096, True, True, True),
    ]


def test_merge_stops_where_the_shortest_reply_stops():
    replies = {ALLOC: [(65536, 0)], DEPTH: [(4096, 1)]}
    assert merge_extents(1000, replies) == [Extent(1000, 4096, False, True, True)]


def test_allocation_depth_zero_means_unallocated_and_neighbours_coalesce():
    replies = {ALLOC: [(4096, 3), (4096, 3), (4096, 0)], DEPTH: [(8192, 0), (4096, 1)]}
    assert merge_extents(0, replies) == [
        Extent(0, 8192, True, True, False),
        Extent(8192, 4096, False, True, True),
    ]


def test_empty_or_zero_length_replies_give_no_extent():
    assert merge_extents(0, {ALLOC: []}) == []
    assert merge_extents(0, {}) == []
    assert merge_extents(0, {ALLOC: [(0, 0), (512, 0)]}) == [Extent(0, 512, False, True, True)]


def test_clip_cuts_a_last_extent_that_runs_past_the_request():
    extents = [Extent(0, 100, False, True, True), Extent(100, 900, True, True, True)]
    assert clip(extents, 300) == [Extent(0, 100, False, True, True), Extent(100, 200, True, True, True)]
    assert clip(extents, 100) == [Extent(0, 100, False, True, True)]


def test_full_copy_plan_reads_data_only_and_skips_zeros_on_a_fresh_target():
    extents = [Extent(0, 3000, False, True, True), Extent(3000, 5000, True, True, False)]
    assert list(plan_operations(extents, 1024, zero_target=True)) == [
        (COPY, 0, 1024), (COPY, 1024, 1024), (COPY, 2048, 952)]


def test_incremental_plan_copies_dirty_data_zeroes_dirty_zeros_and_skips_clean():
    extents = [
        Extent(0, 4096, False, True, True),
        Extent(4096, 4096, False, False, True),
        Extent(8192, 4096, True, True, True),
        Extent(12288, 4096, True, False, True),
    ]
    assert list(plan_operations(extents, 65536, zero_target=False)) == [(COPY, 0, 4096), (ZERO, 8192, 4096)]
    assert count_bytes(extents) == (4096, 4096, 8192)


def test_huge_zero_extents_are_split_into_bounded_zero_requests():
    extents = [Extent(0, 3 * 1024 ** 3, True, True, True)]
    operations = list(plan_operations(extents, 65536, zero_target=False))
    assert [op[0] for op in operations] == [ZERO] * 3
    assert sum(op[2] for op in operations) == 3 * 1024 ** 3


def test_alignment_keeps_whole_chunks_and_turns_mixed_chunks_into_data():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import align_extents
    extents = [
        Extent(0, 4096, False, True, True),      # data in the first 64 KiB chunk...
        Extent(4096, 192512, True, True, True),  # ...then zeros up to 192 KiB + 4 KiB
        Extent(196608, 65536, True, False, True),
    ]
    assert align_extents(extents, 65536) == [
        Extent(0, 65536, False, True, True),
        Extent(65536, 131072, True, True, True),
        Extent(196608, 65536, True, False, True),
    ]


def test_alignment_of_clean_and_dirty_zero_parts_in_one_chunk_copies_it():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import align_extents
    extents = [Extent(0, 32768, True, True, True), Extent(32768, 100000, True, False, True)]
    assert align_extents(extents, 65536) == [
        Extent(0, 65536, False, True, True),
        Extent(65536, 67232, True, False, True),
    ]
    assert align_extents(extents, 1) is extents


def test_an_image_mapped_alone_holds_its_allocated_bytes_and_only_zero_clusters_are_zeros():
    replies = {ALLOC: [(65536, 0), (65536, 3), (65536, 2), (65536, 3)], DEPTH: [(196608, 1), (65536, 0)]}
    extents = merge_extents(0, replies, image_alone=True)
    assert extents == [
        Extent(0, 65536, False, True, True),        # data
        Extent(65536, 65536, True, True, True),     # a zero cluster
        Extent(131072, 65536, False, True, True),   # data that reads as zeros (over a file system's hole)
        Extent(196608, 65536, True, False, False),  # not in this image: its backing file's, or nobody's
    ]
    # An overlay's zero clusters count as zeros written; a full image's, as zeros it needed not write.
    assert list(plan_operations(extents, 65536, zero_target=False)) == [
        (COPY, 0, 65536), (ZERO, 65536, 65536), (COPY, 131072, 65536)]
    assert list(plan_operations(extents, 65536, zero_target=True)) == [(COPY, 0, 65536), (COPY, 131072, 65536)]
