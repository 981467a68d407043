# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The checksum of a backup image: a SHA-256 digest per 64 KiB block, bound to the block's offset, summed.

A copy writes its blocks in parallel and in any order, so the digests are combined by addition modulo
2**256, which no order changes; the offset hashed into every digest makes a block that moved, changed,
went missing or appeared change the sum. A copy computes it on the data as it writes it, and
qemu_backup_verify computes it again from the image alone. Both count the same blocks:

* a data block adds SHA-256(its offset as 8 little-endian bytes || its bytes), unless its bytes are all
  zeros: then it adds nothing, so a file system that keeps written zeros as a hole, or a reader that
  sees a hole, agrees;
* a block written as zeros, which an overlay does to hide its backing file's data, adds
  SHA-256(offset || b"zero");
* holes, and blocks the image does not hold, add nothing.

Blocks start at absolute disk offsets, multiples of 64 KiB; the last block of a disk may be shorter.
"""

from __future__ import annotations

import hashlib

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import CLUSTER_SIZE

ALGORITHM = "sha256-blocks64k"
# One qcow2 cluster: a copy's reads and writes come in whole ones, so every block lies in one buffer.
BLOCK_SIZE = CLUSTER_SIZE
MODULUS = 1 << 256
ZERO_MARK = b"zero"


def data_digest(offset, block):
    """The digest of a data block at offset, as an integer; block is any bytes-like object."""
    digest = hashlib.sha256(offset.to_bytes(8, "little"))
    digest.update(block)
    return int.from_bytes(digest.digest(), "big")


def zero_digest(offset):
    """The digest of a block at offset that was written as zeros."""
    return int.from_bytes(hashlib.sha256(offset.to_bytes(8, "little") + ZERO_MARK).digest(), "big")


class BlockSum:
    """A sum of block digests. One thread keeps each; add() joins them."""

    def __init__(self):
        self.value = 0

    def add_data(self, buf, offset):
        """Add the blocks of buf (an nbd.Buffer) read at offset, a multiple of BLOCK_SIZE."""
        view = memoryview(buf.to_buffer())
        total = self.value
        for start in range(0, len(view), BLOCK_SIZE):
            length = min(BLOCK_SIZE, len(view) - start)
            if not buf.is_zero(start, length):
                total += data_digest(offset + start, view[start:start + length])  # hashlib lets the GIL go
        self.value = total % MODULUS

    def add_zeros(self, offset, length):
        """Add the blocks of [offset, offset+length), written as zeros; offset is a multiple of BLOCK_SIZE."""
        total = self.value
        for block in range(offset, offset + length, BLOCK_SIZE):
            total += zero_digest(block)
        self.value = total % MODULUS

    def add(self, other):
        self.value = (self.value + other.value) % MODULUS

    def text(self):
        """The checksum as recorded: the algorithm's name and 64 hex digits."""
        return "%s:%064x" % (ALGORITHM, self.value)
