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
