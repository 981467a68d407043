# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Dropping restore points from a chain by merging images, on the repository's host, without the VM, under the lease.

A merge (retention.merges) rewrites the images of one kept backup, the target: as a full of its whole view when the
points before it are dropped (a synthetic full), or as an overlay of the kept point before it holding the clusters
of the dropped points between. Its new image has the target's content and file name, so the later incrementals,
whose headers name that file, keep reading the same bytes.

Each step is durable before the next, and the manifest's `consolidation` entry, the journal, says where a merge
stands, so that a kill at any moment leaves a repository that restores and verifies, and the next holder of the lease
finishes or undoes it (resume):

1. writing: the journal names the new images, <file>.merge-<hex>, files of ours beside the old ones. They are
   written (with their checksum, summed in the same pass) and synced. A merge killed here is undone: the new files
   it made are removed, the old images were never touched.
2. replacing: the journal records each new file's identity (device, inode) and checksum; then each is renamed over
   its old image, one atomic step per disk. From here on the merge is finished: a rename not done yet is done. While
   it stands here, every reader sees the manifest as the images are (current_view): a disk whose image is its new
   file reads with its new backing and checksum.
3. removing: the manifest no longer lists the dropped backups, and the journal names their files, which are removed.

The temporary names are trusted only as the journal names them, inside the VM's directory, and only as files of
ours (regular, our owner, mode 0600, one link, and the identity recorded once they are written).
"""

from __future__ import annotations

import os
import secrets
import stat
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import DEFAULT_COMPRESSION_LEVEL
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    remove_file,
    sync_directory,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import layered, served
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.zstd import HAS_ZSTANDARD, missing_zstandard
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.engine import copy_to_image
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import stores_zstd
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.definition_files import definition_files
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.images import disk_usage
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.merge_journal import (
    apply_merge,
    merged_file_identity,
    replaced,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.retention import merges
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.verify import ImageProblem, open_image

# Tests name a step here, "<step>:<fifo>": the merge tells the FIFO it reached it, then waits there to be killed.
PAUSE_ENV = "FLEETBACKUP_TEST_PAUSE"
TEMPORARY_SUFFIX = ".merge-"
# A third of the shortest lock_ttl (60 s): a renewal comes well before the lease could lapse.
LEASE_RENEWAL_SECONDS = 20


def temporary_name(file_name):
    return "%s%s%s" % (file_name, TEMPORARY_SUFFIX, secrets.token_hex(4))


def planned_merges(data, dropped):
    """retention.merges() with what each rewrites: per merge, per disk of the target that has a backing image, the
    `layers` (images, top first) that its new image is made of, down to a full image or to the kept one that becomes
    its `backing`. A disk backed up in full in the target (a raw one) needs no new image."""
    by_name = {b["name"]: b for b in data["backups"]}
    planned = merges(data, dropped)
    for merge in planned:
        merge["rewrites"] = []
        target = by_name.get(merge["target"])
        for disk in target["disks"] if target else ():
            member, entry, layers = target, disk, [disk["file"]]
            encrypted = bool(entry.get("encryption"))
            while entry.get("backing") and member.get("parent") in merge["drop"]:
                member = by_name[member["parent"]]
                entry = next(d for d in member["disks"] if d["file"] == entry["backing"])
                layers.append(entry["file"])
                encrypted = encrypted or bool(entry.get("encryption"))
            if len(layers) > 1 and encrypted:
                raise UserError("Dropping backup %s of %s needs its images merged, and they are encrypted: this "
                                "version consolidates only plain chains. Keep encrypted chains with keep_chains "
                                "(whole chains go without a merge), or leave these backups. Nothing was changed."
                                % (", ".join(merge["drop"]), disk["disk"]))
            if len(layers) > 1:
                merge["rewrites"].append(dict(disk=disk["disk"], file=disk["file"], size=disk["size"],
                                              layers=layers, backing=entry.get("backing")))
    return planned


def dropped_files(data, names):
    """The images and definition files of backups `names` that no other backup of data lists."""
    doomed = [b for b in data["backups"] if b["name"] in names]
    kept = {d["file"] for b in data["backups"] if b["name"] not in names for d in b["disks"]}
    return [f for b in doomed for f in [d["file"] for d in b["disks"]] + definition_files(b) if f not in kept]


def estimate(repository, merge):
    """Bytes a merge would write at most: what the images it is made of take now."""
    return sum(disk_usage(repository.image(name)) for rewrite in merge["rewrites"] for name in rewrite["layers"]
               if os.path.exists(repository.image(name)))


def drop(repository, dropped, keep_lease, check_mode):
    """Drop the backups named in dropped from the manifest, merging images where a kept backup needs them.

    keep_lease: called before each step, to renew the lease or fail when the run lost it. Returns (the dropped
    backups' entries, the merges done or planned: {target, onto, drop, rewrites}).
    """
    data = resume(repository, keep_lease, check_mode)
    planned = planned_merges(data, dropped)
    entries = [b for b in data["backups"] if b["name"] in set(dropped)]
    if check_mode:
        for merge in planned:
            merge["bytes_to_write"] = estimate(repository, merge)
        return entries, planned
    for merge in planned:
        keep_lease()
        _merge(repository, repository.load(), merge, keep_lease)
    return entries, planned


def _merge(repository, data, merge, keep_lease):
    """One merge, through the three steps of the journal."""
    started = time.monotonic()
    journal = dict(phase="writing", target=merge["target"], onto=merge["onto"], drop=merge["drop"],
                   disks=[dict(disk=r["disk"], file=r["file"], temp=temporary_name(r["file"]), backing=r["backing"],
                               identity=None, checksum=None) for r in merge["rewrites"]], remove=[])
    if merge["target"] is not None:
        data["consolidation"] = journal
        repository.save(data)
        _reached("writing")
        try:
            for rewrite, disk in zip(merge["rewrites"], journal["disks"]):
                keep_lease()
                written = _write(repository, rewrite, disk["temp"], renewing(keep_lease))
                rewrite.update(bytes_read=written.bytes_read,
                               bytes_written=disk_usage(repository.image(disk["temp"])))
                disk.update(identity=merged_file_identity(repository.image(disk["temp"])), checksum=written.checksum)
                _reached("written")
        except BaseException:
            if _still_held(keep_lease):  # else the lease's new holder undoes it: only the holder writes
                _undo(repository, data, journal)
            raise
        sync_directory(repository.working)
        journal["phase"] = "replacing"
        keep_lease()  # only the lease's holder writes the manifest
        repository.save(data)
        _reached("replacing")
        keep_lease()
        _replace(repository, journal)
    merge["seconds"] = round(time.monotonic() - started, 3)
    return _finish(repository, data, journal)


def renewing(keep_lease, every=LEASE_RENEWAL_SECONDS, clock=time.monotonic):
    """A copy's report callback that renews the lease every `every` seconds: a merge of a big disk outlasts lock_ttl.
    A lease lost meanwhile fails the copy, which the merge then undoes."""
    renewed = [clock()]

    def report(_done, _total):
        if clock() - renewed[0] >= every:
            keep_lease()
            renewed[0] = clock()
    return report


def _write(repository, rewrite, temp, report):
    """The new image of one disk, from its layers alone, at temp: a full, or an overlay of its new backing."""
    fds = []
    try:
        for name in rewrite["layers"]:
            fds.append(open_image(repository, name))
        # A chain that was stored compressed stays so: its merged image too.
        level = DEFAULT_COMPRESSION_LEVEL if any(stores_zstd(fd) for fd in fds) else None
        if level is not None and not HAS_ZSTANDARD:
            raise UserError("Cannot merge backup %s's images in %s: they are compressed, and %s No image was changed."
                            % (rewrite["layers"][-1], repository.path, missing_zstandard()))
        with served(layered([(fd, "qcow2", False) for fd in fds]), pass_fds=fds) as url:
            return copy_to_image(url, repository.image(temp), "qcow2", rewrite["size"], backing=rewrite["backing"],
                                 image_alone=rewrite["backing"] is not None, compression_level=level, report=report)
    except ImageProblem as problem:
        raise UserError("Cannot merge image %s in %s: it %s. No image was changed; check the repository with "
                        "qemu_backup_verify." % (name, repository.path, problem)) from None
    finally:
        for fd in fds:
            os.close(fd)


def _replace(repository, journal):
    """Rename each new file over its old image: one atomic step per disk, each done once."""
    for disk in journal["disks"]:
        if replaced(repository, disk):
            continue
        temp = repository.image(disk["temp"])
        if not _ours(temp, disk["identity"]):
            raise UserError("A merge of backup %s in %s stopped half-way, and its new image %s is neither in place "
                            "nor where it was written: the repository was changed meanwhile. Check it with "
                            "qemu_backup_verify." % (journal["target"], repository.path, disk["temp"]))
        os.rename(temp, repository.image(disk["file"]))
        _reached("renamed")
    sync_directory(repository.working)


def _finish(repository, data, journal):
    """The manifest with the merge applied and its dropped backups gone, then their files removed."""
    apply_merge(data, journal, journal["disks"])
    remove = dropped_files(data, journal["drop"]) + journal["remove"]
    data["backups"] = [b for b in data["backups"] if b["name"] not in journal["drop"]]
    data["consolidation"] = dict(phase="removing", target=journal["target"], onto=journal["onto"], drop=[],
                                 disks=[], remove=sorted(set(remove)))
    repository.save(data)
    _reached("removing")
    return _remove(repository, data)


def _remove(repository, data):
    listed = {d["file"] for b in data["backups"] for d in b["disks"]}
    listed.update(f for b in data["backups"] for f in definition_files(b))
    repository.remove_images([f for f in data["consolidation"]["remove"] if f not in listed])
    data["consolidation"] = None
    repository.save(data)
    return data


def resume(repository, keep_lease, check_mode=False):
    """The manifest after finishing or undoing a merge that a killed run left (in check mode, as it is)."""
    data = repository.load()
    journal = data.get("consolidation")
    if not journal or check_mode:
        return data
    keep_lease()
    if journal["phase"] == "writing":  # no old image was touched: undo
        return _undo(repository, data, journal)
    if journal["phase"] == "replacing":
        _replace(repository, journal)
        return _finish(repository, data, journal)
    return _remove(repository, data)


def _undo(repository, data, journal):
    """The manifest without a merge that touched no old image yet, and the new files it wrote removed."""
    for disk in journal["disks"]:
        temp = repository.image(disk["temp"])
        if disk["temp"].startswith(disk["file"] + TEMPORARY_SUFFIX) and _ours(temp, disk["identity"]):
            remove_file(temp)
    sync_directory(repository.working)
    data["consolidation"] = None
    repository.save(data)
    return data


def _still_held(keep_lease):
    try:
        keep_lease()
        return True
    except UserError:
        return False


def _ours(path, identity):
    """Whether path is a file this user made as a merge makes its new images, and the very one when identity is
    known."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1
            and stat.S_IMODE(info.st_mode) == 0o600 and identity in (None, merged_file_identity(path)))


def _reached(step):
    """For tests: tell the FIFO that PAUSE_ENV names that the merge reached this step, and wait there to be killed."""
    wanted, _sep, fifo = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted == step and fifo:
        with open(fifo, "w") as stream:
            stream.write(step)
        with open(fifo) as stream:
            stream.read()
