"""The block checksum: order-free, bound to offsets, aware of every block that changes what a restore reads; each
recorded checksum is checked with the algorithm it names, and one of an unknown algorithm is an error."""

import hashlib
import random

import nbd
import pytest
import xxhash

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.checksum import (
    BLOCK_SIZE,
    CURRENT,
    SHA256,
    XXH3_128,
    Algorithm,
    BlockSum,
    UnknownChecksum,
    recorded_algorithm,
)

BLOCKS = {offset: bytes([index + 1]) * BLOCK_SIZE
          for index, offset in enumerate(range(0, 8 * BLOCK_SIZE, BLOCK_SIZE))}
HASHES = {SHA256: hashlib.sha256, XXH3_128: xxhash.xxh3_128}
BOTH = pytest.mark.parametrize("algorithm", [SHA256, XXH3_128], ids=lambda algorithm: algorithm.name)


def buffer(data):
    return nbd.Buffer.from_bytearray(bytearray(data))


def summed(pieces, zeros=(), algorithm=CURRENT, overlay=False):
    """The sum of data pieces {offset: bytes}, added one buffer each in the given order, and of zero ranges."""
    total = BlockSum(algorithm, overlay)
    for offset, data in pieces:
        total.add_data(buffer(data), offset)
    for offset, length in zeros:
        total.add_zeros(offset, length)
    return total.value


def digest(algorithm, offset, data):
    return int.from_bytes(HASHES[algorithm](offset.to_bytes(8, "little") + data).digest(), "big")


def test_new_copies_use_xxh3_128():
    assert CURRENT is XXH3_128
    assert BlockSum().text() == "xxh3-128-blocks64k:" + "0" * 64


@BOTH
def test_it_is_the_sum_of_the_hash_of_offset_and_bytes_modulo_2_256(algorithm):
    expected = sum(digest(algorithm, offset, data) for offset, data in BLOCKS.items()) % 2 ** 256
    total = BlockSum(algorithm)
    total.add_data(buffer(b"".join(BLOCKS.values())), 0)
    assert total.value == expected
    assert total.text() == "%s:%064x" % (algorithm.name, expected)


def test_the_two_algorithms_give_different_sums():
    assert summed(BLOCKS.items(), algorithm=SHA256) != summed(BLOCKS.items(), algorithm=XXH3_128)


@BOTH
def test_the_order_of_buffers_and_of_threads_does_not_matter(algorithm):
    pieces = list(BLOCKS.items())
    forward = summed(pieces, algorithm=algorithm)
    random.Random(7).shuffle(pieces)
    assert summed(pieces, algorithm=algorithm) == forward
    # Two threads' sums, each of half the blocks, add up to the same.
    first = BlockSum(algorithm)
    second = first.new_share()
    for index, (offset, data) in enumerate(pieces):
        (first if index % 2 else second).add_data(buffer(data), offset)
    first.add(second)
    assert first.value == forward
    # Blocks read in one buffer or in many give one sum.
    assert summed([(0, BLOCKS[0] + BLOCKS[BLOCK_SIZE])], algorithm=algorithm) == \
        summed([(0, BLOCKS[0]), (BLOCK_SIZE, BLOCKS[BLOCK_SIZE])], algorithm=algorithm)


@BOTH
def test_offsets_are_bound_in_swapped_moved_changed_missing_or_extra_blocks_change_it(algorithm):
    pieces = dict(BLOCKS)
    original = summed(pieces.items(), algorithm=algorithm)
    swapped = dict(pieces)
    swapped[0], swapped[BLOCK_SIZE] = pieces[BLOCK_SIZE], pieces[0]
    moved = dict(pieces)
    moved[8 * BLOCK_SIZE] = moved.pop(0)
    flipped = dict(pieces)
    flipped[0] = b"\x02" + pieces[0][1:]
    missing = dict(pieces)
    del missing[BLOCK_SIZE]
    for changed in (swapped, moved, flipped, missing):
        assert summed(changed.items(), algorithm=algorithm) != original
    assert summed(list(pieces.items()) + [(9 * BLOCK_SIZE, b"\x01" * BLOCK_SIZE)], algorithm=algorithm) != original


@BOTH
def test_in_a_full_image_data_that_reads_as_zeros_counts_for_nothing_and_a_short_last_block_counts(algorithm):
    assert summed([(0, bytes(4 * BLOCK_SIZE))], algorithm=algorithm) == BlockSum(algorithm).value == 0
    with_zeros = summed([(0, BLOCKS[0] + bytes(BLOCK_SIZE) + BLOCKS[2 * BLOCK_SIZE])], algorithm=algorithm)
    assert with_zeros == summed([(0, BLOCKS[0]), (2 * BLOCK_SIZE, BLOCKS[2 * BLOCK_SIZE])], algorithm=algorithm)
    # The last block of a disk whose size is not a multiple of 64 KiB.
    short = summed([(BLOCK_SIZE, b"\x05" * 512)], algorithm=algorithm)
    assert short == digest(algorithm, BLOCK_SIZE, b"\x05" * 512)


@BOTH
def test_blocks_written_as_zeros_count_each_at_its_offset_and_differ_from_data(algorithm):
    zeroed = summed([], zeros=[(0, 3 * BLOCK_SIZE)], algorithm=algorithm, overlay=True)
    assert zeroed == sum(digest(algorithm, offset, b"zero") for offset in (0, BLOCK_SIZE, 2 * BLOCK_SIZE)) % 2 ** 256
    assert zeroed != 0 and zeroed != summed([], zeros=[(BLOCK_SIZE, 3 * BLOCK_SIZE)], algorithm=algorithm,
                                            overlay=True)
    # A short last block written as zeros counts as the whole block at its offset.
    assert summed([], zeros=[(0, BLOCK_SIZE + 512)], algorithm=algorithm) == \
        summed([], zeros=[(0, 2 * BLOCK_SIZE)], algorithm=algorithm)
    # In any order with data.
    assert summed([(4 * BLOCK_SIZE, BLOCKS[0])], zeros=[(0, BLOCK_SIZE)], algorithm=algorithm) == \
        (summed([], zeros=[(0, BLOCK_SIZE)], algorithm=algorithm)
         + summed([(4 * BLOCK_SIZE, BLOCKS[0])], algorithm=algorithm)) % 2 ** 256


def test_in_an_overlay_a_data_block_of_zeros_adds_its_own_digest_distinct_from_a_hole_and_a_zero_cluster():
    zeros = bytes(BLOCK_SIZE)
    data_of_zeros = summed([(BLOCK_SIZE, zeros)], overlay=True)
    zero_cluster = summed([], zeros=[(BLOCK_SIZE, BLOCK_SIZE)], overlay=True)
    hole = summed([], overlay=True)
    assert data_of_zeros == digest(XXH3_128, BLOCK_SIZE, zeros)
    assert len({data_of_zeros, zero_cluster, hole}) == 3 and hole == 0
    # Bound to its offset like any data block, and counted next to data in one buffer.
    assert summed([(2 * BLOCK_SIZE, zeros)], overlay=True) != data_of_zeros
    assert summed([(0, BLOCKS[0] + zeros)], overlay=True) == (digest(XXH3_128, 0, BLOCKS[0]) + data_of_zeros) % 2 ** 256
    # A full image's zeros are what a restore reads where nothing is: there they count for nothing.
    assert summed([(BLOCK_SIZE, zeros)], overlay=False) == 0


def test_the_old_algorithm_keeps_its_rule_for_overlays_so_old_backups_still_verify():
    zeros = bytes(BLOCK_SIZE)
    assert summed([(BLOCK_SIZE, zeros)], algorithm=SHA256, overlay=True) == 0
    assert summed([(0, BLOCKS[0] + zeros)], algorithm=SHA256, overlay=True) == digest(SHA256, 0, BLOCKS[0])


def test_a_recorded_checksum_names_its_algorithm():
    assert recorded_algorithm("sha256-blocks64k:" + "0a" * 32) is SHA256
    assert recorded_algorithm(BlockSum().text()) is XXH3_128


@pytest.mark.parametrize("recorded,words", [
    ("blake3-blocks64k:" + "0" * 64, "uses the algorithm blake3-blocks64k, which this version of the collection does "
                                     "not know (it knows sha256-blocks64k, xxh3-128-blocks64k)"),
    ("sha256-blocks64k:" + "0" * 63, "is not <algorithm>:<64 hex digits>"),
    ("0" * 64, "is not <algorithm>:<64 hex digits>"),
    ("SHA256-BLOCKS64K:" + "0" * 64, "is not <algorithm>:<64 hex digits>"),
])
def test_an_unknown_or_malformed_checksum_is_an_error_never_a_pass(recorded, words):
    with pytest.raises(UnknownChecksum) as raised:
        recorded_algorithm(recorded)
    assert words in str(raised.value)


def test_a_host_without_the_library_is_told_what_to_install():
    missing = Algorithm("xxh3-128-blocks64k", None, overlay_zero_data_counts=True)
    with pytest.raises(UserError) as raised:
        BlockSum(missing)
    assert "apt install python3-xxhash" in str(raised.value) and "pip install xxhash" in str(raised.value)
