#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_copy
short_description: Copy an NBD export of a backup into a sparse qcow2 or raw image
version_added: 0.1.0
description:
  - Reads a disk exported by M(fleetbackup.qemu.qemu_backup_start) and writes it to O(dest).
  - Only allocated data is read. Holes and zero extents are never read, and the output stays sparse.
  - With O(dirty_bitmap) and O(backing) it writes an incremental backup, a qcow2 overlay whose backing file
    is the previous backup. Only the changed bytes are read; changed extents that now read as zeros are
    written as zeros so that no stale data of the backing file shows through; the rest stays unallocated.
  - The image is written under a temporary name in the directory of O(dest) and renamed when complete,
    so O(dest) never holds a partial backup. Partial images that killed copies left in that directory are deleted.
  - Several NBD connections copy in parallel when the export allows multi-conn, each with many requests in
    flight; memory stays bounded by O(connections) x O(requests) x O(request_size), whatever the disk's size.
  - An existing O(dest) is reported unchanged only when it provably holds this very backup. Each copy records, in the
    extended attribute C(user.fleetbackup.backup) of the image, the export it read (whose name carries the backup id,
    the start and the disk), the disk's size and the changed-block context. Any other O(dest) makes the copy fail,
    saying what it holds, unless O(force) is set.
  - For a backup of M(fleetbackup.qemu.qemu_backup_start), it checks that the point-in-time view held until the
    copy ended. When the guest overwrote data that the scratch space could not keep, the copy fails, saying so,
    and keeps nothing.
  - It sums a checksum of the image as it writes it, without reading anything twice (RV(checksum)), and records
    it with the image's identity. M(fleetbackup.qemu.qemu_backup_verify) checks it later from the image alone.
  - While it copies, it keeps its progress in O(state_dir) on the host that copies, where
    M(fleetbackup.qemu.qemu_backup_copy_status) reads it; run it with C(async) and C(poll=0) to follow it.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - ansible.builtin.files
  - fleetbackup.qemu.vm.copy_progress
  - fleetbackup.qemu.tls.client
  - fleetbackup.qemu.repository.compress
  - fleetbackup.qemu.encryption
options:
  src:
    description:
      - NBD URL of the export, as in RV(fleetbackup.qemu.qemu_backup_start#module:backup.disks[].url),
        for example C(nbd+unix:///vda?socket=/var/tmp/web1.nbd).
      - A server that sends nothing for 60 seconds, while connecting or during the copy, fails the copy.
    type: str
    required: true
  dest:
    description: Path of the backup image to write. Its directory must exist.
    type: path
    required: true
  format:
    description: Format of O(dest).
    type: str
    choices: [qcow2, raw]
    default: qcow2
  force:
    description: Replace an existing O(dest), whatever it holds.
    type: bool
    default: false
  dirty_bitmap:
    description:
      - For an incremental copy, the NBD meta context of changed blocks, as in
        RV(fleetbackup.qemu.qemu_backup_start#module:backup.disks[].dirty_bitmap).
      - A bare bitmap name is taken as C(qemu:dirty-bitmap:NAME).
      - Needs O(backing) and O(format=qcow2).
    type: str
  backing:
    description:
      - The previous backup of this disk, which O(dest) is an overlay of. It is stored relative to the
        directory of O(dest), so that the backup repository can be moved as a whole; that relative name
        must fit in the 1023 bytes that qcow2 stores.
    type: path
  backing_format:
    description:
      - Format of O(backing), as recorded when it was written; stored in the header of O(dest).
      - It is never guessed from the first bytes of O(backing), which a guest could have written to look like
        any format.
    type: str
    choices: [qcow2, raw]
    default: qcow2
  connections:
    description: NBD connections to copy with, when the export allows several (multi-conn); else one.
    type: int
    default: 4
  requests:
    description: Requests in flight per connection.
    type: int
    default: 16
  request_size:
    description:
      - Bytes per read request, a multiple of 64 KiB up to 32 MiB (QEMU's limit). Small requests, many in flight,
        copy fastest.
      - O(connections) x O(requests) x O(request_size), the memory of the read buffers, may be at most 1 GiB.
    type: int
    default: 262144
  bandwidth:
    description:
      - Bytes per second that the reads of all connections together may take, as a number or a size like C(100M)
        or C(1G) (powers of 1024). Beyond the first read of each connection, reads never run ahead of it.
      - C(0) sets no limit.
    type: raw
    default: 0
  mode:
    description:
      - Permissions of O(dest). Disk images hold secrets, so the default is C(0600).
    type: raw
    default: '0600'
requirements:
  - libnbd's Python bindings (Debian package python3-libnbd)
  - the xxhash bindings, for the block checksum (Debian package python3-xxhash)
  - for O(compress=zstd), the zstandard bindings (Debian package python3-zstandard)
seealso:
  - module: fleetbackup.qemu.qemu_backup_start
attributes:
  check_mode:
    support: full
    description: Writes nothing; checks that O(src) answers and reports whether O(dest) would be written.
"""

EXAMPLES = r"""
- name: Full copy of one disk
  fleetbackup.qemu.qemu_backup_copy:
    src: nbd+unix:///vda?socket=/var/tmp/web1-nightly.nbd
    dest: /backup/web1/2026-11-29.vda.qcow2

- name: Full copy over TLS from a start with nbd_tcp, on the backup host
  fleetbackup.qemu.qemu_backup_copy:
    src: nbds://192.0.2.11:40813/web1-nightly/5f3a9c01/vda
    tls_certificates: /etc/fleetbackup/tls
    dest: /backup/web1/2026-11-29.vda.qcow2

- name: Incremental copy, an overlay on the previous backup
  fleetbackup.qemu.qemu_backup_copy:
    src: "{{ item.url }}"
    dirty_bitmap: "{{ item.dirty_bitmap }}"
    backing: "/backup/web1/0001.{{ item.disk }}.qcow2"
    dest: "/backup/web1/0002.{{ item.disk }}.qcow2"
  loop: "{{ started.backup.disks }}"

# Ad hoc, from a shell:
#   ansible localhost -m fleetbackup.qemu.qemu_backup_copy \
#     -a "src=nbd+unix:///vda?socket=/var/tmp/web1.nbd dest=/backup/web1.vda.qcow2"
"""

RETURN = r"""
image:
  description: The backup image, O(dest).
  returned: always
  type: str
  sample: /backup/web1/2026-11-29.vda.qcow2
size:
  description: Virtual size of the disk in bytes.
  returned: when copied
  type: int
  sample: 10737418240
disk_usage:
  description: Bytes the image takes on disk; small for a sparse image.
  returned: when the image exists
  type: int
  sample: 2149580800
bytes_read:
  description: Bytes read from the export (data only; never zeros or unchanged blocks).
  returned: when copied
  type: int
  sample: 2147483648
bytes_zeroed:
  description: Bytes that read as zeros and were therefore not read (left sparse, or written as zeros in an overlay).
  returned: when copied
  type: int
  sample: 8589934592
bytes_unchanged:
  description: For an incremental copy, bytes outside the dirty bitmap, left to the backing file.
  returned: when copied
  type: int
  sample: 0
removed_partials:
  description: Partial images of earlier copies that were killed, found in the directory of O(dest) and deleted.
  returned: when copied
  type: list
  elements: str
  sample: [.2026-11-28.vda.qcow2.part-4711@backup1]
connections:
  description: NBD connections used.
  returned: when copied
  type: int
  sample: 4
elapsed:
  description: Seconds the copy took.
  returned: when copied
  type: float
  sample: 3.2
throughput:
  description: Bytes read per second.
  returned: when copied
  type: int
  sample: 671088640
encryption:
  description: C(luks) when the image is encrypted (O(encryption)), else null.
  returned: when copied, or when O(dest) already holds this backup
  type: str
  sample: luks
checksum:
  description:
    - The checksum of the image, C(xxh3-128-blocks64k:) and 64 hex digits, summed as it was written. Each 64 KiB
      block of data at offset N adds XXH3-128(N as 8 little-endian bytes, then the block's bytes), except, in a full
      image, a block of zeros, which adds nothing; each 64 KiB block an overlay writes as zeros adds XXH3-128(N, then
      C(zero)); the sum is modulo 2**256.
    - For an O(dest) that already holds this backup, the checksum recorded with it; null if it was copied by an
      older version, which recorded none.
  returned: when copied, or when O(dest) already holds this backup
  type: str
  sample: xxh3-128-blocks64k:3f2a...
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import (
    COMPRESS_ARGUMENT_SPEC,
    COPY_PROGRESS_ARGUMENT_SPEC,
    ENCRYPTION_ARGUMENT_SPEC,
    TLS_CLIENT_ARGUMENT_SPEC,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.image_copy import copy_backup


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            src=dict(type="str", required=True),
            **TLS_CLIENT_ARGUMENT_SPEC,
            dest=dict(type="path", required=True),
            format=dict(type="str", choices=["qcow2", "raw"], default="qcow2"),
            force=dict(type="bool", default=False),
            dirty_bitmap=dict(type="str"),
            backing=dict(type="path"),
            backing_format=dict(type="str", choices=["qcow2", "raw"], default="qcow2"),
            connections=dict(type="int", default=4),
            requests=dict(type="int", default=16),
            request_size=dict(type="int", default=256 * 1024),
            mode=dict(type="raw", default="0600"),
            bandwidth=dict(type="raw", default=0),
            **COMPRESS_ARGUMENT_SPEC,
            **COPY_PROGRESS_ARGUMENT_SPEC,
            **ENCRYPTION_ARGUMENT_SPEC,
        ),
        add_file_common_args=True,
        supports_check_mode=True,
    )
    module.run(copy_backup)


if __name__ == "__main__":
    main()
