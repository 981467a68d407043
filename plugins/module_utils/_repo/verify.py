# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Verifying a repository without its VMs: each image alone, each chain's links, each recorded checksum.

Every image is read alone, never through its backing file: qemu-img and qemu-nbd get it as a file
descriptor (opened without following a symbolic link) in an image spec whose backing is null, so no path
that an image names is ever opened. The links of a chain are checked against the manifest instead: an
incremental image must name its parent's image, and the parent's format.

Each image's checksum is summed with the algorithm its record names (checksum.py), by the copy engine: parallel
reads over several connections, block status, the GIL let go. A checksum of an algorithm this collection does not
know makes the image bad, never passed.

An image is bad when anything is wrong with it. Every backup that needs a bad image (the image's own
backup, and each later backup whose chain runs through it) cannot be restored, and is named with it.
"""

from __future__ import annotations

import os
import stat
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import needs_secret
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.checksum import UnknownChecksum, recorded_algorithm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.engine import checksum_of_image_export
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    SecretError,
    alone,
    image_damage,
    image_info,
    served,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.chains import backing_entry, images_needed


def verify_vm(repository, wanted=None, encryption=None):
    """The report on the backups of one VM (those named in wanted, by default all) and every image they need;
    encryption (an Encryption) opens the encrypted ones."""
    data = repository.load_existing()
    backups = _chosen(repository, data, wanted)
    needs = {b["name"]: images_needed(data, b) for b in data["backups"]}
    images = {}
    for backup in backups:
        for member, disk in needs[backup["name"]]:
            if disk["file"] not in images:
                images[disk["file"]] = check_image(repository, data, member, disk, encryption)
    bad = [report for report in images.values() if report["problems"]]
    for report in bad:
        report["dependents"] = [b["name"] for b in data["backups"]
                                if report["image"] in {d["file"] for _member, d in needs[b["name"]]}]
    reads = [report.pop("read") for report in images.values() if "read" in report]
    return dict(vm=repository.vm, backups=[_backup_report(backup, needs[backup["name"]], images) for backup in backups],
                bad_images=bad, unverified_images=[r["image"] for r in images.values() if not r["verified"]
                                                   and not r["problems"]], images_checked=len(images),
                **read_totals(reads))


def read_totals(reads):
    """bytes_read, read_seconds and read_rate (bytes per second) of (bytes, seconds) reads, taken one after another."""
    total_bytes = sum(length for length, _seconds in reads)
    seconds = sum(seconds for _length, seconds in reads)
    # To the microsecond: the fleet's totals add these up again, and a fast read must not become 0 s.
    return dict(bytes_read=total_bytes, read_seconds=round(seconds, 6),
                read_rate=int(total_bytes / seconds) if seconds else 0)


def _chosen(repository, data, wanted):
    if not wanted:
        return data["backups"]
    known = {b["name"] for b in data["backups"]}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError("No backup named %s in %s. Its backups are: %s." % (", ".join(unknown), repository.path,
                                                                            ", ".join(sorted(known)) or "none"))
    return [b for b in data["backups"] if b["name"] in wanted]


def _backup_report(backup, needs, images):
    needed = [images[disk["file"]] for _member, disk in needs]
    problems = ["%s: %s" % (r["image"], "; ".join(r["problems"])) for r in needed if r["problems"]]
    unverified = [r["image"] for r in needed if not r["verified"] and not r["problems"]]
    if problems:
        state = "bad"
    elif unverified:
        state = "unverified"
        problems = ["%s has no recorded checksum (an older copy made it), so its content cannot be verified"
                    % name for name in unverified]
    else:
        state = "ok"
    return dict(name=backup["name"], state=state, problems=problems)


def check_image(repository, data, backup, disk, encryption=None):
    """What is wrong with one image: its file, its qcow2 structure, its link to its parent, its checksum. An encrypted
    image without encryption, or with a wrong secret, raises UserError: the image is not to blame."""
    report = dict(image=disk["file"], backup=backup["name"], disk=disk["disk"], problems=[], verified=False)
    try:
        fd = open_image(repository, disk["file"])
    except ImageProblem as problem:
        report["problems"].append(str(problem))
        return report
    try:
        try:
            info = image_info(alone(fd, disk.get("format", "qcow2")), pass_fds=(fd,))
        except FleetbackupError as err:
            report["problems"].append("cannot be read as %s: %s" % (disk.get("format", "qcow2"), err))
            return report
        encrypted = bool(info.get("encrypted"))
        needs_secret(repository.image(disk["file"]), encrypted, encryption)
        image = alone(fd, disk.get("format", "qcow2"), encrypted)
        if encrypted != bool(disk.get("encryption")):
            report["problems"].append("it is %s, though the manifest records it %s" % (
                "encrypted" if encrypted else "not encrypted", "encrypted" if disk.get("encryption") else "plain"))
        try:
            report["problems"] += (_structure_problems(image, fd, info, disk, encryption)
                                   + _link_problems(data, backup, disk, info))
        except SecretError as err:
            raise err.of(repository.image(disk["file"])) from None
        if not disk.get("checksum"):
            return report
        try:
            algorithm = recorded_algorithm(disk["checksum"])
        except UnknownChecksum as problem:
            report["problems"].append(str(problem))
            return report
        algorithm.check_available()  # a host without the library fails the module, the image is not to blame
        try:
            with served(image, pass_fds=(fd,), encryption=encryption if encrypted else None) as url:
                started = time.monotonic()
                copied = checksum_of_image_export(url, bool(info.get("backing-filename")), algorithm)
                report["read"] = (copied.bytes_read, time.monotonic() - started)
                checksum = copied.checksum
        except FleetbackupError as err:
            report["problems"].append("its data cannot be read: %s" % err)
            return report
    finally:
        os.close(fd)
    if checksum != disk["checksum"]:
        report["problems"].append("its data has checksum %s, not %s as recorded when it was written: it changed "
                                  "since" % (checksum, disk["checksum"]))
    else:
        report["verified"] = True
    return report


class ImageProblem(Exception):
    """An image file that cannot be checked at all."""


def open_image(repository, name):
    """A file descriptor of a repository's image, opened without following a link; ImageProblem when it is none."""
    path = repository.image(name)
    try:
        # O_NONBLOCK: a FIFO in its place must not hang us; fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageProblem("missing from %s" % repository.path) from None
    except OSError as err:
        raise ImageProblem("cannot be opened (%s): an image must be a plain file, not a symbolic link"
                           % err.strerror) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageProblem("is not a regular file")
    return fd


def _structure_problems(image, fd, info, disk, encryption):
    problems = []
    if info["virtual-size"] != disk["size"]:
        problems.append("its size is %d bytes, not %d as recorded" % (info["virtual-size"], disk["size"]))
    if info["format"] == "qcow2":
        damage = image_damage(image, pass_fds=(fd,), encryption=encryption if info.get("encrypted") else None)
        if damage:
            problems.append("qemu-img check finds it damaged: %s" % damage)
    return problems


def _link_problems(data, backup, disk, info):
    """How the backing file the image names differs from the parent's image that the manifest records."""
    named, named_format = info.get("backing-filename"), info.get("backing-filename-format")
    if not disk.get("backing"):
        return ["it names a backing file, %s, though the manifest records a full image" % named] if named else []
    _member, entry = backing_entry({b["name"]: b for b in data["backups"]}, backup, disk)
    if entry is None:
        return ["its backing image %s, as the manifest records it, belongs to no backup of its chain in the manifest "
                "(its parent: %s)" % (disk["backing"], backup.get("parent"))]
    problems = []
    if named != disk["backing"]:
        problems.append("it names %s as its backing file, not its parent's image %s" % (named, disk["backing"]))
    parent_format = entry.get("format", "qcow2")
    if named_format != parent_format:
        problems.append("it names %s as its backing file's format, not %s" % (named_format, parent_format))
    return problems
