# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Pure extent logic: merging NBD meta contexts and planning copy operations.

Nothing here touches a socket, so all of it is unit-tested with plain lists.
"""

from __future__ import annotations

from collections import namedtuple

CONTEXT_ALLOCATION = "base:allocation"
CONTEXT_ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

STATE_HOLE = 1
STATE_ZERO = 2
# What a qcow2 zero cluster reports: a hole that reads as zeros. Data that reads as zeros is not one.
ZERO_CLUSTER = STATE_HOLE | STATE_ZERO
DIRTY = 1

# Block status is asked in windows no larger than this (QEMU and the NBD spec cap one reply).
STATUS_WINDOW = 2 * 1024 ** 3

# One zero request covers at most this much, keeping each request well under 32-bit counts.
MAX_ZERO_REQUEST = 1024 ** 3

Extent = namedtuple("Extent", "start length zero dirty allocated")
Extent.__doc__ = """A run of bytes with one status in every context.

zero: reads as zeros (base:allocation flag 2); dirty: changed since the
checkpoint (always true without a bitmap); allocated: some layer of the
chain holds it (always true without qemu:allocation-depth).

For an image mapped alone (opened without its backing file, to check it),
dirty means that the image itself holds the bytes, and zero that it holds
them as a zero cluster.
"""

COPY = "copy"
ZERO = "zero"


def dirty_context(bitmap):
    """The meta context that exports dirty bitmap `bitmap`."""
    return bitmap if bitmap.startswith(DIRTY_BITMAP_PREFIX) else DIRTY_BITMAP_PREFIX + bitmap


def merge_extents(start, replies, bitmap_context=None, image_alone=False):
    """Merge block-status replies of several contexts into Extents.

    replies maps a context name to its list of (length, flags) pairs, all
    starting at `start`. Contexts split the disk at different offsets, so a
    merged extent ends at the nearest boundary of any of them; the result
    stops where the shortest reply stops. image_alone: the export is one
    image without its backing file (see Extent).
    """
    cursors = {name: _Cursor(entries) for name, entries in replies.items()}
    if not cursors or any(cursor.exhausted for cursor in cursors.values()):
        return []
    extents = []
    offset = start
    while not any(cursor.exhausted for cursor in cursors.values()):
        length = min(cursor.remaining for cursor in cursors.values())
        flags = {name: cursor.flags for name, cursor in cursors.items()}
        extents.append(_extent(offset, length, flags, bitmap_context, image_alone))
        offset += length
        for cursor in cursors.values():
            cursor.advance(length)
    return coalesce(extents)


def _extent(offset, length, flags, bitmap_context, image_alone):
    allocation = flags.get(CONTEXT_ALLOCATION, 0)
    depth = flags.get(CONTEXT_ALLOCATION_DEPTH)
    allocated = depth is None or depth != 0
    if image_alone:
        return Extent(offset, length, allocation & ZERO_CLUSTER == ZERO_CLUSTER, allocated, allocated)
    dirty = flags[bitmap_context] & DIRTY if bitmap_context else True
    return Extent(offset, length, bool(allocation & STATE_ZERO), bool(dirty), allocated)


class _Cursor:
    """Walks one context's (length, flags) pairs."""

    def __init__(self, entries):
        self._entries = [entry for entry in entries if entry[0] > 0]
        self._index = 0
        self.remaining = self._entries[0][0] if self._entries else 0

    @property
    def exhausted(self):
        return self._index >= len(self._entries)

    @property
    def flags(self):
        return self._entries[self._index][1]

    def advance(self, length):
        self.remaining -= length
        if self.remaining == 0:
            self._index += 1
            if not self.exhausted:
                self.remaining = self._entries[self._index][0]


def coalesce(extents):
    """Join neighbours that have the same status."""
    joined = []
    for extent in extents:
        previous = joined[-1] if joined else None
        if previous and previous[2:] == extent[2:] and previous.start + previous.length == extent.start:
            joined[-1] = previous._replace(length=previous.length + extent.length)
        else:
            joined.append(extent)
    return joined


def clip(extents, end):
    """Drop what lies at or past `end`: a server may answer past the request."""
    clipped = []
    for extent in extents:
        if extent.start >= end:
            break
        clipped.append(extent._replace(length=min(extent.length, end - extent.start)))
    return clipped


# A chunk whose parts differ becomes dirty data: reading it gives the point-in-time bytes of all its parts.
MIXED = (False, True, True)


def align_extents(extents, alignment):
    """Extents whose boundaries are multiples of alignment (a qcow2 cluster), for writers of whole clusters."""
    if alignment <= 1 or not extents:
        return extents
    begin, end = extents[0].start, extents[-1].start + extents[-1].length
    aligned = []
    partial = {}
    for extent in extents:
        start, stop = extent.start, extent.start + extent.length
        first_whole = -(-start // alignment) * alignment
        last_whole = stop // alignment * alignment
        if first_whole < last_whole:
            aligned.append(extent._replace(start=first_whole, length=last_whole - first_whole))
            pieces = ((start, first_whole), (last_whole, stop))
        else:
            pieces = ((start, stop),)
        status = tuple(extent[2:])
        for piece_start, piece_stop in pieces:
            if piece_start < piece_stop:
                for chunk in range(piece_start // alignment, (piece_stop - 1) // alignment + 1):
                    partial[chunk] = status if partial.get(chunk, status) == status else MIXED
    for chunk, status in partial.items():
        start = max(begin, chunk * alignment)
        aligned.append(Extent(start, min(chunk * alignment + alignment, end) - start, *status))
    return coalesce(sorted(aligned))


def plan_operations(extents, request_size, zero_target):
    """Turn extents into (kind, offset, length) operations.

    Dirty data is copied in requests of at most request_size. Dirty zeros are
    written as zero requests unless the target already reads as zeros there
    (a fresh image). Clean extents are left alone, so an overlay's backing
    file shows through.
    """
    for extent in extents:
        if not extent.dirty:
            continue
        if extent.zero:
            if not zero_target:
                yield from _split(ZERO, extent.start, extent.length, MAX_ZERO_REQUEST)
        else:
            yield from _split(COPY, extent.start, extent.length, request_size)


def _split(kind, start, length, step):
    end = start + length
    for offset in range(start, end, step):
        yield kind, offset, min(step, end - offset)


def count_bytes(extents):
    """Sum the data, zero and clean bytes that extents describe."""
    data = zero = clean = 0
    for extent in extents:
        if not extent.dirty:
            clean += extent.length
        elif extent.zero:
            zero += extent.length
        else:
            data += extent.length
    return data, zero, clean
