# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  repository:
    description: The repository, a directory with one subdirectory per VM.
    type: path
    required: true
  vm:
    description:
      - The VM's name, its subdirectory in the repository, which holds its images and C(manifest.json).
      - A plain file name.
    type: str
    required: true
"""

    # How a copy stores the images it writes.
    COMPRESS = r"""
options:
  compress:
    description:
      - V(zstd) writes qcow2 images whose clusters are compressed with zstd, as C(qemu-img convert -c -o
        compression_type=zstd) would; QEMU 5.1 and later and C(qemu-img) read them directly, as every restore, verify
        and drill here does. A cluster that does not shrink is stored as it is.
      - It takes CPU time on the host that copies, spread over the copy's connections; the checksum is of the disk's
        data, whatever the compression.
      - Needs the zstandard bindings (Debian package C(python3-zstandard)) on that host; the image's format must be
        qcow2, which it always is in a repository.
      - Not with O(encryption), which QEMU writes with its clusters uncompressed; the two together are refused.
      - V(none) stores every cluster as it is.
    type: str
    choices: [none, zstd]
    default: none
  compress_level:
    description:
      - The zstd level of O(compress=zstd), 1 to 19 (smallest), or zstd's fast levels -1 to -10 (fastest).
      - On a disk of programs and their files, level 1 kept 38% of the bytes and level 3 37%, for a third more CPU.
    type: int
    default: 1
"""

    # The repository's root as every module that reads or writes a repository opens it; with DOCUMENTATION, or alone.
    LINK = r"""
options:
  follow_repository_link:
    description:
      - Follow a symbolic link at O(repository) or at a VM's directory, such as C(/backup) pointing to an NFS mount.
      - Without it, such a link is refused, naming it and its target, since whoever can plant a link there steers
        root's writes anywhere. With it, the link must lead to a directory owned by root (or this user) that neither
        group nor others can write.
      - Either way the repository is opened once and then used through its descriptor, and a directory of the system
        (C(/), C(/etc), C(/usr), C(/boot) and the like) is refused.
    type: bool
    default: false
"""
