"""The block checksum: order-free, bound to offsets, blind to zeros that are data, aware of zeros written."""

import hashlib
import random

import nbd

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.checksum import BLOCK_SIZE, BlockSum

BLOCKS = {offset: bytes([index + 1]) * BLOCK_SIZE
          for index, offset in enumerate(range(0, 8 * BLOCK_SIZE, BLOCK_SIZE))}


def buffer(data):
    return nbd.Buffer.from_bytearray(bytearray(data))


def summed(pieces, zeros=()):
    """The sum of data pieces {offset: bytes}, added one buffer each in the given order, and of zero ranges."""
    total = BlockSum()
    for offset, data in pieces:
        total.add_data(buffer(data), offset)
    for offset, length in zeros:
        total.add_zeros(offset, length)
    return total.value


def test_it_is_the_sum_of_sha256_of_offset_and_bytes_modulo_2_256():
    expected = sum(int.from_bytes(hashlib.sha256(offset.to_bytes(8, "little") + data).digest(), "big")
                   for offset, data in BLOCKS.items()) % 2 ** 256
    total = BlockSum()
    total.add_data(buffer(b"".join(BLOCKS.values())), 0)
    assert total.value == expected
    assert total.text() == "sha256-blocks64k:%064x" % expected


def test_the_order_of_buffers_and_of_threads_does_not_matter():
    pieces = list(BLOCKS.items())
    forward = summed(pieces)
    random.Random(7).shuffle(pieces)
    assert summed(pieces) == forward
    # Two threads' sums, each of half the blocks, add up to the same.
    first, second = BlockSum(), BlockSum()
    for index, (offset, data) in enumerate(pieces):
        (first if index % 2 else second).add_data(buffer(data), offset)
    first.add(second)
    assert first.value == forward
    # Blocks read in one buffer or in many give one sum.
    assert summed([(0, BLOCKS[0] + BLOCKS[BLOCK_SIZE])]) == summed([(0, BLOCKS[0]), (BLOCK_SIZE, BLOCKS[BLOCK_SIZE])])


def test_offsets_are_bound_in_swapped_moved_changed_missing_or_extra_blocks_change_it():
    pieces = dict(BLOCKS)
    original = summed(pieces.items())
    swapped = dict(pieces)
    swapped[0], swapped[BLOCK_SIZE] = pieces[BLOCK_SIZE], pieces[0]
    assert summed(swapped.items()) != original
    moved = dict(pieces)
    moved[8 * BLOCK_SIZE] = moved.pop(0)
    assert summed(moved.items()) != original
    flipped = dict(pieces)
    flipped[0] = b"\x02" + pieces[0][1:]
    assert summed(flipped.items()) != original
    missing = dict(pieces)
    del missing[BLOCK_SIZE]
    assert summed(missing.items()) != original
    assert summed(list(pieces.items()) + [(9 * BLOCK_SIZE, b"\x01" * BLOCK_SIZE)]) != original


def test_data_that_reads_as_zeros_counts_for_nothing_and_a_short_last_block_counts():
    assert summed([(0, bytes(4 * BLOCK_SIZE))]) == BlockSum().value == 0
    with_zeros = summed([(0, BLOCKS[0] + bytes(BLOCK_SIZE) + BLOCKS[2 * BLOCK_SIZE])])
    assert with_zeros == summed([(0, BLOCKS[0]), (2 * BLOCK_SIZE, BLOCKS[2 * BLOCK_SIZE])])
    # The last block of a disk whose size is not a multiple of 64 KiB.
    short = summed([(BLOCK_SIZE, b"\x05" * 512)])
    assert short == int.from_bytes(hashlib.sha256(BLOCK_SIZE.to_bytes(8, "little") + b"\x05" * 512).digest(), "big")


def test_blocks_written_as_zeros_count_each_at_its_offset_and_differ_from_data():
    zeroed = summed([], zeros=[(0, 3 * BLOCK_SIZE)])
    assert zeroed == sum(int.from_bytes(hashlib.sha256(offset.to_bytes(8, "little") + b"zero").digest(), "big")
                         for offset in (0, BLOCK_SIZE, 2 * BLOCK_SIZE)) % 2 ** 256
    assert zeroed != 0 and zeroed != summed([], zeros=[(BLOCK_SIZE, 3 * BLOCK_SIZE)])
    # A short last block written as zeros counts as the whole block at its offset.
    assert summed([], zeros=[(0, BLOCK_SIZE + 512)]) == summed([], zeros=[(0, 2 * BLOCK_SIZE)])
    # In any order with data.
    assert summed([(4 * BLOCK_SIZE, BLOCKS[0])], zeros=[(0, BLOCK_SIZE)]) == \
        (summed([], zeros=[(0, BLOCK_SIZE)]) + summed([(4 * BLOCK_SIZE, BLOCKS[0])])) % 2 ** 256
