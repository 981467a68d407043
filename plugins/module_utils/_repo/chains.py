# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The chains of a manifest's backups: which backups, and which images, a backup needs to be restored.

A damaged manifest (a parent it no longer lists, parents that loop) is reported, never followed in circles.
"""

from __future__ import annotations

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError


def images_needed(data, backup):
    """(backup, disk entry) of every image a restore of backup reads: each disk's, then its parents' in turn."""
    by_name = {b["name"]: b for b in data["backups"]}
    needed = []
    for disk in backup["disks"]:
        member, entry = backup, disk
        needed.append((member, entry))
        visited = {member["name"]}  # a damaged manifest whose parents loop: each image is checked once all the same
        while entry.get("backing"):
            member, entry = backing_entry(by_name, member, entry, visited)
            if entry is None:
                break  # check_image reports the broken link on the child
            needed.append((member, entry))
    return needed


def backing_entry(by_name, member, entry, visited=None):
    """(backup, disk entry) of the image that the disk entry of backup member names as its backing: its parent's, or
    an older ancestor's while a merge that drops the parent stands half-way (merge_journal.py); (None, None) when
    no ancestor holds it. visited: the backups walked already (added to), never walked again, so that a damaged
    manifest whose parents loop ends."""
    visited = {member["name"]} if visited is None else visited
    while member.get("parent") in by_name and member["parent"] not in visited:
        member = by_name[member["parent"]]
        visited.add(member["name"])
        found = next((d for d in member["disks"] if d["file"] == entry["backing"]), None)
        if found is not None:
            return member, found
    return None, None


def chain_of(data, backup):
    """The backups whose images `backup` needs, itself first, back to its full backup."""
    by_name = {b["name"]: b for b in data["backups"]}
    chain = [backup]
    while chain[-1].get("parent"):
        parent = chain[-1]["parent"]
        if parent not in by_name:
            raise UserError("Backup %s needs backup %s, which the manifest no longer lists: take a full backup."
                            % (chain[-1]["name"], parent))
        if any(member["name"] == parent for member in chain):
            raise UserError("The manifest is damaged: backup %s's parents lead back to %s, a loop." % (
                backup["name"], parent))
        chain.append(by_name[parent])
    return chain


def missing_images(repository, data, backup):
    """The images of backup's chain that are not in the repository."""
    return [disk["file"] for member in chain_of(data, backup) for disk in member["disks"]
            if not os.path.isfile(repository.image(disk["file"]))]
