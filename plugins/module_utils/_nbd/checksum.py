# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The checksum of a backup image: a digest per 64 KiB block, bound to the block's offset, summed.

A copy writes its blocks in parallel and in any order, so the digests are combined by addition modulo
2**256, which no order changes; the offset hashed into every digest makes a block that moved, changed,
went missing or appeared change the sum. A copy computes it on the data as it writes it, and
qemu_backup_verify computes it again from the image alone. Both count the same blocks, those that change
what a restore reads:

* a data block adds H(its offset as 8 little-endian bytes || its bytes). When its bytes are all zeros
  it adds that too in an overlay, where it hides its backing file's data; in a full image it adds
  nothing, since a restore reads zeros there whether the image stores them or keeps a hole (as a
  file system that compresses does);
* a block written as zeros, which an overlay does to hide its backing file's data, adds H(offset || b"zero");
* holes, and blocks the image does not hold, add nothing.

The recorded checksum names its algorithm: H and the rule for zeros. New copies use CURRENT (xxh3-128);
images written before it keep sha256-blocks64k, whose data blocks of zeros add nothing, overlays' too.
Blocks start at absolute disk offsets, multiples of 64 KiB; the last block of a disk may be shorter.
"""

from __future__ import annotations

import hashlib
import re

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.fast_hash import HAS_XXHASH, missing_xxhash, xxhash
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import CLUSTER_SIZE

# One qcow2 cluster: a copy's reads and writes come in whole ones, so every block lies in one buffer.
BLOCK_SIZE = CLUSTER_SIZE
MODULUS = 1 << 256
ZERO_MARK = b"zero"
RECORDED = re.compile(r"^([a-z0-9-]+):([0-9a-f]{64})$")


class Algorithm:
    """A block checksum: its name, its hash H (a hashlib-style constructor), and whether an overlay's data
    blocks of zeros count."""

    def __init__(self, name, new_hash, overlay_zero_data_counts):
        self.name = name
        self.new_hash = new_hash
        self.overlay_zero_data_counts = overlay_zero_data_counts

    def check_available(self):
        """Raise UserError, saying what to install, when this host lacks the library of H."""
        if self.new_hash is None:
            raise UserError(missing_xxhash())

    def data_digest(self, offset, block):
        """The digest of a data block at offset, as an integer; block is any bytes-like object."""
        digest = self.new_hash(offset.to_bytes(8, "little"))
        digest.update(block)  # both libraries let the GIL go for a 64 KiB block
        return int.from_bytes(digest.digest(), "big")

    def zero_digest(self, offset):
        """The digest of a block at offset that was written as zeros."""
        return int.from_bytes(self.new_hash(offset.to_bytes(8, "little") + ZERO_MARK).digest(), "big")


SHA256 = Algorithm("sha256-blocks64k", hashlib.sha256, overlay_zero_data_counts=False)
# Against bit rot, lost or misplaced clusters and bugs; the README says why not a cryptographic hash.
XXH3_128 = Algorithm("xxh3-128-blocks64k", xxhash.xxh3_128 if HAS_XXHASH else None, overlay_zero_data_counts=True)
CURRENT = XXH3_128
ALGORITHMS = {algorithm.name: algorithm for algorithm in (SHA256, XXH3_128)}


class UnknownChecksum(UserError):
    """A recorded checksum of no algorithm that this collection knows."""


def recorded_algorithm(checksum):
    """The Algorithm of a recorded checksum ("<name>:<64 hex digits>"); UnknownChecksum for any other."""
    match = RECORDED.match(checksum)
    if not match:
        raise UnknownChecksum("its recorded checksum %s is not <algorithm>:<64 hex digits>, so it cannot be checked"
                              % checksum[:100])
    if match.group(1) not in ALGORITHMS:
        raise UnknownChecksum("its recorded checksum uses the algorithm %s, which this version of the collection does "
                              "not know (it knows %s): verify it with the version that wrote it"
                              % (match.group(1), ", ".join(sorted(ALGORITHMS))))
    return ALGORITHMS[match.group(1)]


class BlockSum:
    """A sum of block digests of one image (overlay: it has a backing file). One thread keeps each; add() joins them."""

    def __init__(self, algorithm=CURRENT, overlay=False):
        algorithm.check_available()
        self.algorithm = algorithm
        self.overlay = overlay
        self._zero_data_counts = overlay and algorithm.overlay_zero_data_counts
        self.value = 0

    def add_data(self, buf, offset):
        """Add the blocks of buf (an nbd.Buffer) read at offset, a multiple of BLOCK_SIZE."""
        view = memoryview(buf.to_buffer())
        total = self.value
        for start in range(0, len(view), BLOCK_SIZE):
            length = min(BLOCK_SIZE, len(view) - start)
            if self._zero_data_counts or not buf.is_zero(start, length):
                total += self.algorithm.data_digest(offset + start, view[start:start + length])
        self.value = total % MODULUS

    def add_zeros(self, offset, length):
        """Add the blocks of [offset, offset+length), written as zeros; offset is a multiple of BLOCK_SIZE."""
        total = self.value
        for block in range(offset, offset + length, BLOCK_SIZE):
            total += self.algorithm.zero_digest(block)
        self.value = total % MODULUS

    def add(self, other):
        self.value = (self.value + other.value) % MODULUS

    def new_share(self):
        """An empty sum of the same algorithm and kind of image, for another thread."""
        return BlockSum(self.algorithm, self.overlay)

    def text(self):
        """The checksum as recorded: the algorithm's name and 64 hex digits."""
        return "%s:%064x" % (self.algorithm.name, self.value)
