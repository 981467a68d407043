# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A VM's backup repository: its directory, its images and files, and the manifest of its complete backups.

Only a backup whose copies all finished is ever written to the manifest, and
the manifest is replaced atomically, so a failed or killed run leaves the
repository as it was. What a run writes into it is the run policy's (policy.py);
which run may write it now is the lease's (lease.py).

A repository may sit on a shared file system: every name read from the
manifest or given for a VM must be a plain name inside the VM's directory
before any file is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.manifest_schema import (
    MANIFEST_FORMAT,
    check_manifest,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.chains import images_needed
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.merge_journal import current_view
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.definition_files import (
    definition_file_names,
    definition_files,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.opened_directory import OpenedDirectory
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import QemuImgError, image_info
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    check_plain_name,
    create_exclusive,
    is_plain_name,
    read_regular_file,
    remove_file,
    sync_directory,
    write_json_atomic,
)

MANIFEST = "manifest.json"


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
        # A merge killed half-way: the manifest as the images are, until the lease's next holder finishes it.
        return current_view(self, check_manifest(data, self.manifest_path))

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

    def discard_unlisted(self, name, files, check_mode=False):
        """The files of backup `name` (these, and its definition files) that are there and no backup of the manifest
        lists, removed (in check mode, only listed): what a run that failed or died wrote."""
        backups = self.load()["backups"]
        listed = {disk["file"] for backup in backups for disk in backup["disks"]}
        listed.update(f for backup in backups for f in definition_files(backup))
        # Only names of the backup's own making: never the manifest, the lease or another backup's file.
        written = [f for f in list(files) + list(definition_file_names(name))
                   if f not in listed and f.startswith(name + ".")]
        present = [f for f in written if os.path.lexists(self.image(f))]
        return present if check_mode else self.remove_images(present)

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
