# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The journal of a merge (consolidation.py) in the manifest, as every reader of the manifest applies it: the
manifest as the images are now, at any moment of a merge."""

from __future__ import annotations

import os
import stat

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import backup_level


def merged_file_identity(path):
    """[inode, size] of the regular file at path (never through a link), else None: not the device number, which an
    NFS mount hands out anew on each host and at each mount, while a merge may be resumed on another."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return [info.st_ino, info.st_size] if stat.S_ISREG(info.st_mode) else None


def current_view(repository, data):
    """The manifest as the images are now: while a merge is replacing images, each disk whose image already is its
    new file reads with its new backing and checksum, and its backup with its new parent once all its disks do.
    Changes data in place and returns it; a manifest with no merge in that step is returned as it is."""
    journal = data.get("consolidation")
    if journal and journal["phase"] == "replacing":
        apply_merge(data, journal, [disk for disk in journal["disks"] if replaced(repository, disk)])
    return data


def replaced(repository, disk):
    return merged_file_identity(repository.image(disk["file"])) == disk["identity"]


def apply_merge(data, journal, rewritten):
    """The target's entry with the disks of rewritten (journal disks) as rewritten, and as a whole once all are."""
    target = next((b for b in data["backups"] if b["name"] == journal["target"]), None)
    if target is None:  # a merge that only drops backups
        return
    for new in rewritten:
        entry = next(d for d in target["disks"] if d["disk"] == new["disk"])
        entry.update(backing=new["backing"], checksum=new["checksum"],
                     mode="incremental" if new["backing"] else "full")
    if len(rewritten) < len(journal["disks"]):
        return
    onto = next((b for b in data["backups"] if b["name"] == journal["onto"]), None)
    old_chain = target["chain"]
    target.update(parent=onto and onto["name"], level=backup_level(target["disks"]),
                  incremental=onto and onto["checkpoint"])
    if onto is None:  # the target starts its chain now; so do the later ones
        for backup in data["backups"]:
            if backup["chain"] == old_chain and backup["name"] not in journal["drop"]:
                backup["chain"] = target["name"]
