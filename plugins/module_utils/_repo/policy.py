# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A repository's run policy: whether a run is due, its level, the entry it records, and which chains pruning drops.

Chains start at a full backup; incrementals are qcow2 overlays on their parent's images; a disk that cannot hold a
checkpoint (raw) is backed up in full in every backup. The plan decides each disk's level once; the start can
only fall back to full where a checkpoint turned out unusable (fallback_to_full), and the record says so.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.change_rate import HISTORY as CHANGE_HISTORY
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.chains import missing_images
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import named_disks

DURATION = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
UNSAFE = re.compile(r"[^A-Za-z0-9]")


def parse_duration(value):
    """Seconds from 3600, '30m', '12h', '7d' or '2w'."""
    match = DURATION.match(str(value))
    if not match:
        raise UserError("Invalid duration '%s': give seconds, or a number with s, m, h, d or w (like 12h)." % value)
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def backup_id_for(vm, name):
    """A backup_id unique per VM and run, within QEMU's 32 characters."""
    return "%s-%s-%s" % (UNSAFE.sub("", vm)[:6] or "vm", hashlib.sha1(vm.encode()).hexdigest()[:4],
                         name.replace("T", "").replace("Z", ""))


def image_file(name, disk):
    """The image of a disk in backup `name`."""
    return "%s.%s.qcow2" % (name, UNSAFE.sub("_", disk))


def backup_level(disks):
    """A backup is incremental when any of its disks continues the chain, full when none does."""
    return "incremental" if any(disk["mode"] == "incremental" for disk in disks) else "full"


def chain_facts(repository, data, now):
    """What a plan needs to know of the repository, as plain data that may travel to the VM's host: the newest
    backup, the name of a new one, the first image the newest's chain lacks, the checkpoints the manifest names,
    and the change-rate history."""
    backups = data["backups"]
    newest = backups[-1] if backups else None
    missing = missing_images(repository, data, newest) if newest else []
    return dict(vm=repository.vm, newest=newest, name=_unique_name([b["name"] for b in backups], now),
                missing=missing[0] if missing else None,
                checkpoints=sorted({b["checkpoint"] for b in backups if b.get("checkpoint")}),
                history=[{key: b[key] for key in ("name", "level", "dirty_bytes", "disk_bytes")}
                         for b in backups if "dirty_bytes" in b][-CHANGE_HISTORY:])


def not_due(facts, max_age, now):
    """Why no backup is due now (the newest is younger than max_age), or None."""
    newest = facts["newest"]
    if newest and max_age and now - newest["finished"] < max_age:
        return "the newest backup %s is %ds old, younger than max_age %ds" % (
            newest["name"], now - newest["finished"], max_age)
    return None


def plan(repository, data, level, max_age, vm_disks, wanted_disks, now):
    """plan_from() the repository's chain_facts()."""
    return plan_from(chain_facts(repository, data, now), level, max_age, vm_disks, wanted_disks, now)


def plan_from(facts, level, max_age, vm_disks, wanted_disks, now):
    """Decide what a run does: nothing (not due), a full backup, or an incremental on the newest backup."""
    vm, newest = facts["vm"], facts["newest"]
    reason = not_due(facts, max_age, now)
    if reason:
        return dict(due=False, reason=reason)
    disks, unknown = named_disks(vm_disks, wanted_disks, lambda disk: (disk["disk"], disk["node"]),
                                 lambda disk: not disk["read_only"])
    if unknown:
        known = ", ".join(d["disk"] for d in vm_disks)
        raise UserError("Some of the disks %s are not on VM %s; its disks are: %s." % (wanted_disks, vm, known))
    problem = _incremental_problem(facts, disks)
    if level == "incremental" and problem:
        raise UserError("Cannot take an incremental backup of %s: %s. Use level auto or full." % (vm, problem))
    parent = newest if level != "full" and not problem else None
    if parent:
        reason = "the chain of %s continues" % parent["chain"]
    else:
        reason = "level full was asked" if level == "full" else problem
    name = facts["name"]
    by_disk = {d["disk"]: d for d in parent["disks"]} if parent else {}
    planned = []
    for disk in disks:
        continues = parent is not None and _holds_checkpoints(disk)
        checkpoint = _checkpoint(disk, parent["checkpoint"]) if continues else None
        planned.append(dict(
            disk=disk["disk"], size=disk["size"], file=image_file(name, disk["disk"]),
            mode="incremental" if continues else "full",
            backing=by_disk[disk["disk"]]["file"] if continues else None,
            backing_format=by_disk[disk["disk"]].get("format", "qcow2") if continues else None,
            reason=None if continues or not parent else "a %s disk is backed up in full every time" % disk["format"],
            # A stopped VM's checkpoint has no count (QEMU counts, not the image): the disk's size bounds it.
            expected_bytes=disk["size"] if checkpoint is None or checkpoint["dirty_bytes"] is None
            else checkpoint["dirty_bytes"]))
    return dict(
        due=True, reason=reason, name=name, level=backup_level(planned), backup_id=backup_id_for(vm, name),
        checkpoint="ckpt-%s" % name, incremental=parent["checkpoint"] if parent else None,
        parent=parent["name"] if parent else None, chain=parent["chain"] if parent else name,
        disks=planned, expected_bytes=sum(d["expected_bytes"] for d in planned), started=now)


def _holds_checkpoints(disk):
    return disk.get("format", "qcow2") == "qcow2"


def _incremental_problem(facts, disks):
    """Why the newest backup cannot be the parent of an incremental now, or None."""
    newest = facts["newest"]
    if newest is None:
        return "the repository has no complete backup yet"
    previous = {d["disk"]: d for d in newest["disks"]}
    if sorted(previous) != sorted(d["disk"] for d in disks):
        return "the disks changed since backup %s (%s, now %s)" % (
            newest["name"], ", ".join(sorted(previous)), ", ".join(sorted(d["disk"] for d in disks)))
    if not any(_holds_checkpoints(disk) for disk in disks):
        return "no disk of the VM can hold a checkpoint (none is qcow2)"
    chain_encryption = {d.get("encryption") for d in newest["disks"]}
    if "encryption" in facts and chain_encryption != {facts["encryption"]}:
        return "the chain of %s is %s, and this run's backup is %s: a chain is all encrypted or all plain" % (
            newest["name"], "encrypted" if None not in chain_encryption else "not encrypted",
            "encrypted" if facts["encryption"] else "not encrypted")
    if facts["missing"]:
        return "image %s, which the chain of %s needs, is missing from the repository" % (
            facts["missing"], newest["name"])
    for disk in (d for d in disks if _holds_checkpoints(d)):
        checkpoint = _checkpoint(disk, newest["checkpoint"])
        if checkpoint is None:
            return "checkpoint %s of backup %s is missing on disk %s" % (
                newest["checkpoint"], newest["name"], disk["disk"])
        if not checkpoint["usable"]:
            return "checkpoint %s on disk %s cannot be used (inconsistent or resized)" % (
                newest["checkpoint"], disk["disk"])
        if previous[disk["disk"]]["size"] != disk["size"]:
            return "disk %s was resized since backup %s" % (disk["disk"], newest["name"])
    return None


def _checkpoint(disk, name):
    return next((c for c in disk["checkpoints"] if c["name"] == name), None)


def _unique_name(names, now):
    """The time, and a random part: two runs in the same second never share a name."""
    taken = set(names)
    while True:
        name = "%s-%s" % (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)), secrets.token_hex(2))
        if name not in taken:
            return name


def record(data, planned, started_disks, copies, now, definition=None, consistency=None, directory=None):
    """Append a complete backup: each planned disk at its planned level, or full where the start fell back to full
    (its result says so), with what its copy read and summed.

    copies: the copy of each of started_disks. A copy is of the disk it names (its disk, or its image: the planned
    file in directory, the repository's real path), else of the started disk at its place in the list.
    consistency: {consistency, freeze} of the start, kept in the entry.
    """
    modes = {disk["disk"]: disk["mode"] for disk in started_disks}
    images = {os.path.join(directory, disk["file"]): disk["disk"] for disk in planned["disks"]} if directory else {}
    copied = {}
    for index, copy in enumerate(copies):
        if "bytes_read" not in copy:
            continue
        image = os.path.realpath(copy["image"]) if copy.get("image") and images else None
        if image and image not in images:
            raise UserError("Not recording backup %s: a copy wrote %s, which is no image of it (%s)."
                            % (planned["name"], copy["image"], ", ".join(sorted(images))))
        disk = copy.get("disk") or images.get(image) or (
            started_disks[index]["disk"] if index < len(started_disks) else None)
        copied[disk] = copy
    missing = [d["disk"] for d in planned["disks"] if d["disk"] not in copied]
    if missing:
        raise UserError("Not recording backup %s: disks %s were not copied." % (planned["name"], ", ".join(missing)))
    surprises = [d["disk"] for d in planned["disks"] if d["mode"] == "full" and modes[d["disk"]] != "full"]
    if surprises:
        raise UserError("Not recording backup %s: the plan backs up disks %s in full, and the start did not: start "
                        "with the plan's incremental (none) for them." % (planned["name"], ", ".join(surprises)))
    disks = []
    for disk in planned["disks"]:
        mode = modes[disk["disk"]]  # the planned level, or full where the start fell back
        copy = copied[disk["disk"]]
        disks.append(dict(disk=disk["disk"], file=disk["file"], format="qcow2", size=disk["size"],
                          bytes_read=copy["bytes_read"], checksum=copy.get("checksum"), mode=mode,
                          backing=disk["backing"] if mode == "incremental" else None,
                          **({"encryption": copy["encryption"]} if copy.get("encryption") else {})))
    level = backup_level(disks)
    continues = level == "incremental"
    entry = dict(name=planned["name"], level=level, parent=planned["parent"] if continues else None,
                 chain=planned["chain"] if continues else planned["name"],
                 checkpoint=planned["checkpoint"], incremental=planned["incremental"] if continues else None,
                 started=planned["started"], finished=now, disks=disks)
    if continues:  # the change-rate history: what the incremental disks' checkpoints counted, of their size
        incremental = [planned_disk for planned_disk, disk in zip(planned["disks"], disks)
                       if disk["mode"] == "incremental"]
        entry.update(dirty_bytes=sum(d["expected_bytes"] for d in incremental),
                     disk_bytes=sum(d["size"] for d in incremental))
    if consistency:
        entry.update(consistency)
    if definition:
        entry["definition"] = definition
    data["backups"].append(entry)
    return entry


def chains_beyond(backups, keep_chains):
    """The names of the backups of whole chains beyond the newest keep_chains (0 keeps all)."""
    chains = []
    for backup in backups:
        if backup["chain"] not in chains:
            chains.append(backup["chain"])
    doomed = set(chains[:-keep_chains]) if keep_chains and len(chains) > keep_chains else set()
    return [b["name"] for b in backups if b["chain"] in doomed]


def obsolete_checkpoints(data, pruned):
    """Checkpoints no longer needed in QEMU: all but the newest backup's, which the next incremental starts from."""
    newest = data["backups"][-1]["checkpoint"] if data["backups"] else None
    names = [b["checkpoint"] for b in data["backups"] + pruned if b.get("checkpoint")]
    return sorted(set(names) - {newest})
