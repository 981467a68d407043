# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VM's backup repository: its images, a manifest of the complete backups, and the lease of the run at work.

Only a backup whose copies all finished is ever written to the manifest, and
the manifest is replaced atomically, so a failed or killed run leaves the
repository as it was. Chains start at a full backup; incrementals are qcow2
overlays on their parent's images; a disk that cannot hold a checkpoint (raw)
is backed up in full in every backup.

A repository may sit on a shared file system: every name read from the
manifest or given for a VM must be a plain name inside the VM's directory
before any file is touched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import time
from contextlib import contextmanager

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.manifest_schema import MANIFEST_FORMAT, check_manifest
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.opened_directory import OpenedDirectory
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import QemuImgError, image_info
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    check_plain_name,
    create_exclusive,
    flock_within,
    is_plain_name,
    read_regular_file,
    remove_file,
    sync_directory,
    utc,
    write_json_atomic,
)

MANIFEST = "manifest.json"
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


class RepositoryRoot(OpenedDirectory):
    """The repository: a directory with one directory per VM, opened once."""

    def __init__(self, given, follow_link=False, create=False, missing_ok=False):
        super().__init__(given, "The repository", follow_link, create, missing_ok=missing_ok)

    def vm_names(self):
        """The plain names of the VM directories that hold a manifest."""
        return sorted(name for name in os.listdir(self.working) if is_plain_name(name)
                      and os.path.isdir(os.path.join(self.working, name))
                      and os.path.isfile(os.path.join(self.working, name, MANIFEST)))


class Repository:
    """The directory <root>/<vm> of one VM, reached through the root's descriptor (and its own, once it exists).

    root: a RepositoryRoot, or its path. create: make the VM's directory if it is missing. missing_ok: a missing
    repository reads as one without backups. As a context manager, it closes its VM directory's descriptor.
    """

    def __init__(self, root, vm, follow_link=False, create=False, missing_ok=False):
        self.vm = check_plain_name(vm, "VM name")
        self.root = root if isinstance(root, RepositoryRoot) else RepositoryRoot(root, follow_link, create,
                                                                                 missing_ok)
        self.directory = OpenedDirectory(os.path.join(self.root.working, vm), "The directory of VM %s" % vm,
                                         follow_link, create, os.path.join(self.root.path, vm), missing_ok=True)
        self.path, self.working = self.directory.path, self.directory.working
        self.manifest_path = os.path.join(self.path, MANIFEST)

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.directory.close()

    def exists(self):
        return os.path.isdir(self.working)

    def load(self):
        try:
            fd = os.open(os.path.join(self.working, MANIFEST), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK |
                         os.O_CLOEXEC)
        except FileNotFoundError:
            return dict(format=MANIFEST_FORMAT, vm=self.vm, backups=[])
        except OSError as err:
            raise UserError("Cannot read the manifest %s (%s): it must be a plain file."
                            % (self.manifest_path, err.strerror)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError("The manifest %s is not a regular file: remove what is there." % self.manifest_path)
        try:
            with os.fdopen(fd) as stream:
                data = json.load(stream)
        except ValueError as err:
            raise UserError("The manifest %s is damaged (%s): restore it from a copy; its images are untouched."
                            % (self.manifest_path, err)) from None
        return check_manifest(data, self.manifest_path)

    def load_existing(self):
        """load() a repository that must exist; UserError when it has no manifest."""
        if not os.path.exists(os.path.join(self.working, MANIFEST)):
            raise UserError("%s is no backup repository of VM %s: it has no manifest.json." % (self.path, self.vm))
        return self.load()

    def save(self, data):
        """Replace the manifest atomically and durably."""
        write_json_atomic(self.working, MANIFEST, check_manifest(data, self.manifest_path))

    def image(self, file_name):
        """The path through which we and our programs reach an image."""
        return os.path.join(self.working, check_plain_name(file_name, "Image name"))

    def write_file(self, file_name, content):
        """A new file of this VM's directory (mode 0600, never through a link), written durably."""
        created = create_exclusive(self.working, check_plain_name(file_name, "File name"))
        try:
            with os.fdopen(created.fd, "wb") as stream:
                stream.write(content)
                stream.flush()
                os.fsync(stream.fileno())
        except BaseException:
            remove_file(created.path)
            raise
        return file_name

    def read_file(self, file_name):
        """The content of a plain file of this VM's directory (never through a link)."""
        return read_regular_file(os.path.join(self.working, check_plain_name(file_name, "File name")),
                                 "The repository's file")

    def remove_images(self, file_names):
        """Delete images of this VM's directory; the names removed."""
        removed = [name for name in file_names if remove_file(self.image(name))]
        if removed:
            sync_directory(self.working)
        return removed

    def recorded(self, name=None):
        """The named backup, or the newest, from the manifest; UserError when there is none."""
        return self.find(self.load_existing(), name)

    def chain(self, disk):
        """qemu-img's description of a recorded disk's image and its whole backing chain; UserError when broken."""
        source = self.image(disk["file"])
        try:
            return image_info(source, chain=True)
        except QemuImgError as err:
            raise UserError("The backup chain of disk %s is broken at %s: %s" % (disk["disk"], source, err)) from None

    def check_chain(self, data, backup, disk):
        """The chain that the images' own headers name is the one the manifest records, file by file and format by
        format: QEMU follows the headers, and anyone who can write the repository can write them."""
        found = [(os.path.normpath(info["filename"]), info["format"]) for info in self.chain(disk)]
        recorded = [(os.path.normpath(self.image(entry["file"])), entry.get("format", "qcow2"))
                    for _member, entry in images_needed(data, dict(backup, disks=[disk]))]
        if found != recorded:
            raise UserError("The images of disk %s name the chain %s, but the manifest records %s: the repository "
                            "was changed; check it with qemu_backup_verify." % (
                                disk["disk"], ", ".join("%s (%s)" % entry for entry in found),
                                ", ".join("%s (%s)" % entry for entry in recorded)))

    def nvram(self, definition):
        """The UEFI variables a backup kept, checked against their recorded checksum; None when it kept none."""
        nvram = (definition or {}).get("nvram")
        if not nvram:
            return None
        content = self.read_file(nvram["file"])
        if hashlib.sha256(content).hexdigest() != nvram["sha256"]:
            raise UserError("The NVRAM %s in %s does not match the checksum its backup recorded: it was damaged."
                            % (nvram["file"], self.path))
        return content

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


def plan(repository, data, level, max_age, vm_disks, wanted_disks, now):
    """Decide what a run does: nothing (not due), a full backup, or an incremental on the newest backup."""
    vm = repository.vm
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
    problem = _incremental_problem(repository, data, newest, disks)
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
        continues = parent is not None and _holds_checkpoints(disk)
        checkpoint = _checkpoint(disk, parent["checkpoint"]) if continues else None
        planned.append(dict(
            disk=disk["disk"], size=disk["size"], file="%s.%s.qcow2" % (name, UNSAFE.sub("_", disk["disk"])),
            backing=by_disk[disk["disk"]]["file"] if continues else None,
            backing_format=by_disk[disk["disk"]].get("format", "qcow2") if continues else None,
            reason=None if continues or not parent else "a %s disk is backed up in full every time" % disk["format"],
            # A stopped VM's checkpoint has no count (QEMU counts, not the image): the disk's size bounds it.
            expected_bytes=disk["size"] if checkpoint is None or checkpoint["dirty_bytes"] is None
            else checkpoint["dirty_bytes"]))
    return dict(
        due=True, reason=reason, name=name, level=chosen, backup_id=backup_id_for(vm, name),
        checkpoint="ckpt-%s" % name, incremental=parent["checkpoint"] if parent else None,
        parent=parent["name"] if parent else None, chain=parent["chain"] if parent else name,
        disks=planned, expected_bytes=sum(d["expected_bytes"] for d in planned), started=now)


def _holds_checkpoints(disk):
    return disk.get("format", "qcow2") == "qcow2"


def _incremental_problem(repository, data, newest, disks):
    """Why the newest backup cannot be the parent of an incremental now, or None."""
    if newest is None:
        return "the repository has no complete backup yet"
    previous = {d["disk"]: d for d in newest["disks"]}
    if sorted(previous) != sorted(d["disk"] for d in disks):
        return "the disks changed since backup %s (%s, now %s)" % (
            newest["name"], ", ".join(sorted(previous)), ", ".join(sorted(d["disk"] for d in disks)))
    if not any(_holds_checkpoints(disk) for disk in disks):
        return "no disk of the VM can hold a checkpoint (none is qcow2)"
    missing = missing_images(repository, data, newest)
    if missing:
        return "image %s, which the chain of %s needs, is missing from the repository" % (missing[0], newest["name"])
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


def _unique_name(backups, now):
    """The time, and a random part: two runs in the same second never share a name."""
    taken = {b["name"] for b in backups}
    while True:
        name = "%s-%s" % (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)), secrets.token_hex(2))
        if name not in taken:
            return name


def images_needed(data, backup):
    """(backup, disk entry) of every image a restore of backup reads: each disk's, then its parents' in turn."""
    by_name = {b["name"]: b for b in data["backups"]}
    needed = []
    for disk in backup["disks"]:
        member, entry = backup, disk
        needed.append((member, entry))
        visited = {member["name"]}
        while entry.get("backing") and member.get("parent") in by_name:
            if member["parent"] in visited:
                break  # a damaged manifest whose parents loop: each image is checked once all the same
            member = by_name[member["parent"]]
            visited.add(member["name"])
            entry = next((d for d in member["disks"] if d["file"] == entry["backing"]), None)
            if entry is None:
                break  # check_image reports the broken link on the child
            needed.append((member, entry))
    return needed


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


def definition_file_names(name):
    """(domain XML, NVRAM): the files a backup of a libvirt domain keeps beside its images."""
    return "%s.domain.xml" % name, "%s.nvram" % name


def definition_files(backup):
    """The files of a recorded backup besides its images."""
    definition = backup.get("definition") or {}
    return [name for name in (definition.get("domain_xml"), (definition.get("nvram") or {}).get("file")) if name]


def store_definition(repository, name, definition):
    """Write a libvirt backup's definition (RV backup.libvirt of the start) beside its images.

    The manifest entry's part: the files, the checkpoint's XML, and what the backup could not keep.
    """
    if not isinstance(definition.get("domain_xml"), str) or not isinstance(definition.get("nvram") or {}, dict):
        raise UserError("definition must be the libvirt part of qemu_backup_start's result (backup.libvirt), with "
                        "its domain_xml.")
    xml_file, nvram_file = definition_file_names(name)
    stored = dict(domain_xml=repository.write_file(xml_file, definition["domain_xml"].encode()),
                  checkpoint_xml=definition.get("checkpoint_xml"), nvram=None,
                  not_backed_up=definition.get("not_backed_up") or [])
    nvram = definition.get("nvram")
    if nvram:
        try:
            content = base64.b64decode(nvram["content"], validate=True)
        except (KeyError, ValueError, TypeError):
            content = None
        if content is None or hashlib.sha256(content).hexdigest() != nvram.get("sha256"):
            raise UserError("The NVRAM of backup %s does not match its checksum: it was damaged on its way; run the "
                            "backup again." % name)
        stored["nvram"] = dict(file=repository.write_file(nvram_file, content), path=nvram["path"],
                               sha256=nvram["sha256"])
    return stored


def record(data, planned, started_disks, copies, now, definition=None, consistency=None):
    """Append a complete backup. Each disk's level comes from what the start really did.

    consistency: {consistency, freeze} of the start, kept in the entry.
    """
    modes = {d["disk"]: d["mode"] for d in started_disks}
    # copies are {disk, bytes_read, checksum}, or results of qemu_backup_copy, whose image is the planned file.
    by_file = {d["file"]: d["disk"] for d in planned["disks"]}
    copied = {c.get("disk") or by_file.get(os.path.basename(c.get("image", ""))): c for c in copies
              if "bytes_read" in c}
    missing = [d["disk"] for d in planned["disks"] if d["disk"] not in copied]
    if missing:
        raise UserError("Not recording backup %s: disks %s were not copied." % (planned["name"], ", ".join(missing)))
    disks = []
    for disk in planned["disks"]:
        full = modes[disk["disk"]] == "full"
        disks.append(dict(disk=disk["disk"], file=disk["file"], format="qcow2", size=disk["size"],
                          bytes_read=copied[disk["disk"]]["bytes_read"], checksum=copied[disk["disk"]].get("checksum"),
                          mode=modes[disk["disk"]], backing=None if full else disk["backing"]))
    level = "full" if all(d["mode"] == "full" for d in disks) else "incremental"
    entry = dict(name=planned["name"], level=level, parent=None if level == "full" else planned["parent"],
                 chain=planned["name"] if level == "full" else planned["chain"],
                 checkpoint=planned["checkpoint"], incremental=planned["incremental"] if level != "full" else None,
                 started=planned["started"], finished=now, disks=disks)
    if consistency:
        entry.update(consistency)
    if definition:
        entry["definition"] = definition
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
    return pruned, [d["file"] for b in pruned for d in b["disks"]] + [f for b in pruned for f in definition_files(b)]


def obsolete_checkpoints(data, pruned):
    """Checkpoints no longer needed in QEMU: all but the newest backup's, which the next incremental starts from."""
    newest = data["backups"][-1]["checkpoint"] if data["backups"] else None
    names = [b["checkpoint"] for b in data["backups"] + pruned if b.get("checkpoint")]
    return sorted(set(names) - {newest})


LEASE = "lock"
LEASE_LOCK_WAIT = 30


class Lease:
    """Who is at work on a VM's repository: one run at a time, across hosts, surviving the run's short processes.

    The lock file holds the holding run's id, a description of it, and an expiry that the run renews at each
    step. A run killed by SIGKILL renews nothing, and its lease lapses when it expires. Reading and changing the
    lease happens under an exclusive flock of the file itself, which is never replaced.
    """

    def __init__(self, repository):
        self.repository = repository
        self.path = os.path.join(repository.path, LEASE)
        self.working = os.path.join(repository.working, LEASE)

    def take(self, run_id, holder, ttl, now):
        """Take the lease for run_id, or renew it; UserError naming the holder when another live run has it."""
        with self._locked() as (fd, current):
            if current and current["run_id"] != run_id and current["expires"] > now:
                raise UserError(
                    "The repository of %s (%s) is locked by another run: %s, run %s, since %s, until %s unless it "
                    "renews. One run per VM works on a repository at a time; wait for it. A run that died frees the "
                    "lock when it expires." % (self.repository.vm, self.repository.path, current["holder"],
                                               current["run_id"], utc(current["taken"]), utc(current["expires"])))
            taken = current["taken"] if current and current["run_id"] == run_id else now
            lease = dict(run_id=run_id, holder=holder, host=socket.gethostname(), taken=taken, expires=now + ttl)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(lease, sort_keys=True).encode(), 0)
            os.fsync(fd)
            return dict(lease, taken_over=current if current and current["run_id"] != run_id else None)

    def check(self, run_id, now):
        """UserError unless run_id holds the lease now: a run must not write once another has taken over."""
        with self._locked() as (_fd, current):
            if not current or current["run_id"] != run_id or current["expires"] <= now:
                raise UserError("Run %s no longer holds the lease of %s (%s): it expired or another run took it. "
                                "Nothing was written; run the backup again."
                                % (run_id, self.repository.path, current and current["holder"]))

    def release(self, run_id):
        """Give the lease up if run_id holds it; whether it did."""
        with self._locked() as (fd, current):
            if not current or current["run_id"] != run_id:
                return False
            os.ftruncate(fd, 0)
            os.fsync(fd)
            return True

    @contextmanager
    def _locked(self):
        """(fd, the current lease or None) under an exclusive flock of the lease file."""
        try:
            fd = os.open(self.working, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise UserError("Cannot open the lease %s of the repository (%s): the repository must be writable by "
                            "this user, and the lease a plain file." % (self.path, err.strerror)) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
            os.close(fd)
            raise UserError("The lease %s is not a file that fleetbackup made (a link, or another user's): remove it "
                            "after checking what it is." % self.path)
        try:
            if not flock_within(fd, LEASE_LOCK_WAIT):
                raise UserError("The lease %s stayed locked for %ds, though its holders keep it for milliseconds: "
                                "is its file system hung?" % (self.path, LEASE_LOCK_WAIT))
            content = os.pread(fd, 65536, 0)
            try:
                current = json.loads(content) if content else None
            except ValueError:
                current = None  # torn by a crash mid-write: nobody holds it
            yield fd, current
        finally:
            os.close(fd)
