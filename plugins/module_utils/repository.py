# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VM's backup repository: its images and a manifest of the complete backups.

Only a backup whose copies all finished is ever written to the manifest, and
the manifest is replaced atomically, so a failed or killed run leaves the
repository as it was. Chains start at a full backup; incrementals are qcow2
overlays on their parent's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
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
    return "%s-%s-%s" % (UNSAFE.sub("", vm)[:8] or "vm", hashlib.sha1(vm.encode()).hexdigest()[:6],
                         name.replace("T", "").rstrip("Z"))


class Repository:
    def __init__(self, path):
        self.path = path
        self.manifest_path = os.path.join(path, MANIFEST)

    def load(self, vm=None):
        try:
            with open(self.manifest_path) as stream:
                data = json.load(stream)
        except FileNotFoundError:
            return dict(format=MANIFEST_FORMAT, vm=vm, backups=[])
        except ValueError as err:
            raise UserError("The manifest %s is damaged (%s): restore it from a copy; its images are untouched."
                            % (self.manifest_path, err)) from None
        if data.get("format") != MANIFEST_FORMAT:
            raise UserError("The manifest %s has format %s; this collection reads format %d."
                            % (self.manifest_path, data.get("format"), MANIFEST_FORMAT))
        return data

    def save(self, data):
        """Replace the manifest atomically and durably."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        temporary = self.manifest_path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as stream:
            json.dump(data, stream, indent=1, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, self.manifest_path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def image(self, file_name):
        return os.path.join(self.path, file_name)

    def find(self, data, name=None):
        """The named backup, or the newest; UserError when there is none."""
        backups = data["backups"]
        if not backups:
            raise UserError("The repository %s holds no complete backup." % self.path)
        if name is None:
            return backups[-1]
        for backup in backups:
            if backup["name"] == name:
                return backup
        raise UserError("No backup named '%s' in %s. Its backups are: %s."
                        % (name, self.path, ", ".join(b["name"] for b in backups)))


def plan(data, vm, level, max_age, vm_disks, wanted_disks, now):
    """Decide what a run does: nothing (not due), a full backup, or an incremental on the newest backup."""
    backups = data["backups"]
    newest = backups[-1] if backups else None
    if newest and max_age and now - newest["finished"] < max_age:
        return dict(due=False, reason="the newest backup %s is %ds old, younger than max_age %ds"
                    % (newest["name"], now - newest["finished"], max_age))
    disks = [d for d in vm_disks if not d["read_only"]] if not wanted_disks else \
        [d for d in vm_disks if d["disk"] in wanted_disks or d["node"] in wanted_disks]
    if wanted_disks and len(disks) != len(set(wanted_disks)):
        known = ", ".join(d["disk"] for d in vm_disks)
        raise UserError("Some of the disks %s are not on VM %s; its disks are: %s." % (wanted_disks, vm, known))
    problem = _incremental_problem(newest, disks)
    if level == "full" or (level == "auto" and problem):
        chosen, parent = "full", None
        reason = "level full was asked" if level == "full" else problem
    elif problem:
        raise UserError("Cannot take an incremental backup of %s: %s. Use level auto or full." % (vm, problem))
    else:
        chosen, parent, reason = "incremental", newest, "the chain of %s continues" % newest["chain"]
    name = _unique_name(backups, now)
    by_disk = {d["disk"]: d for d in parent["disks"]} if parent else {}
    planned = []
    for disk in disks:
        checkpoint = _checkpoint(disk, parent["checkpoint"]) if parent else None
        planned.append(dict(
            disk=disk["disk"], size=disk["size"], file="%s.%s.qcow2" % (name, UNSAFE.sub("_", disk["disk"])),
            backing=by_disk[disk["disk"]]["file"] if parent else None,
            expected_bytes=checkpoint["dirty_bytes"] if checkpoint else disk["size"]))
    return dict(
        due=True, reason=reason, name=name, level=chosen, backup_id=backup_id_for(vm, name),
        checkpoint="ckpt-%s" % name, incremental=parent["checkpoint"] if parent else None,
        parent=parent["name"] if parent else None, chain=parent["chain"] if parent else name,
        disks=planned, expected_bytes=sum(d["expected_bytes"] for d in planned), started=now)


def _incremental_problem(newest, disks):
    """Why the newest backup cannot be the parent of an incremental now, or None."""
    if newest is None:
        return "the repository has no complete backup yet"
    previous = {d["disk"]: d for d in newest["disks"]}
    if sorted(previous) != sorted(d["disk"] for d in disks):
        return "the disks changed since backup %s (%s, now %s)" % (
            newest["name"], ", ".join(sorted(previous)), ", ".join(sorted(d["disk"] for d in disks)))
    for disk in disks:
        checkpoint = _checkpoint(disk, newest["checkpoint"])
        if checkpoint is None:
            return "checkpoint %s of backup %s is missing on disk %s" % (newest["checkpoint"], newest["name"],
                                                                          disk["disk"])
        if not checkpoint["usable"]:
            return "checkpoint %s on disk %s cannot be used (inconsistent or resized)" % (newest["checkpoint"],
                                                                                         disk["disk"])
        if previous[disk["disk"]]["size"] != disk["size"]:
            return "disk %s was resized since backup %s" % (disk["disk"], newest["name"])
    return None


def _checkpoint(disk, name):
    return next((c for c in disk["checkpoints"] if c["name"] == name), None)


def _unique_name(backups, now):
    name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    taken = {b["name"] for b in backups}
    suffix = 1
    unique = name
    while unique in taken:
        suffix += 1
        unique = "%s-%d" % (name, suffix)
    return unique


def record(data, planned, started_disks, copies, now):
    """Append a complete backup. Each disk's level comes from what the start really did."""
    modes = {d["disk"]: d["mode"] for d in started_disks}
    # copies are {disk, bytes_read}, or the results of a loop of qemu_backup_copy over the started disks.
    read = {c.get("disk") or c["item"]["disk"]: c["bytes_read"] for c in copies if "bytes_read" in c}
    missing = [d["disk"] for d in planned["disks"] if d["disk"] not in read]
    if missing:
        raise UserError("Not recording backup %s: disks %s were not copied." % (planned["name"], ", ".join(missing)))
    disks = []
    for disk in planned["disks"]:
        full = modes[disk["disk"]] == "full"
        disks.append(dict(disk=disk["disk"], file=disk["file"], size=disk["size"], bytes_read=read[disk["disk"]],
                          mode=modes[disk["disk"]], backing=None if full else disk["backing"]))
    level = "full" if all(d["mode"] == "full" for d in disks) else "incremental"
    entry = dict(name=planned["name"], level=level, parent=None if level == "full" else planned["parent"],
                 chain=planned["name"] if level == "full" else planned["chain"],
                 checkpoint=planned["checkpoint"], incremental=planned["incremental"] if level != "full" else None,
                 started=planned["started"], finished=now, disks=disks)
    data["backups"].append(entry)
    return entry


def prune(data, keep_chains):
    """Drop whole chains beyond the newest keep_chains. Returns (pruned backups, files to delete)."""
    chains = []
    for backup in data["backups"]:
        if backup["chain"] not in chains:
            chains.append(backup["chain"])
    doomed = set(chains[:-keep_chains]) if keep_chains and len(chains) > keep_chains else set()
    pruned = [b for b in data["backups"] if b["chain"] in doomed]
    data["backups"] = [b for b in data["backups"] if b["chain"] not in doomed]
    return pruned, [d["file"] for b in pruned for d in b["disks"]]


def obsolete_checkpoints(data, pruned):
    """Checkpoints no longer needed in QEMU: all but the newest backup's, which the next incremental starts from."""
    newest = data["backups"][-1]["checkpoint"] if data["backups"] else None
    names = [b["checkpoint"] for b in data["backups"] + pruned if b.get("checkpoint")]
    return sorted(set(names) - {newest})
