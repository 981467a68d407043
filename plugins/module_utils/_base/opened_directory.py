# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Directories that we open once and then reach only through their descriptors, so that a link planted or a
directory renamed after the check changes nothing; never one of the system's."""

from __future__ import annotations

import os
import stat

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import alias_path, forget_path_alias

# Directories of the system itself, and trees of it, that are never a repository, nor hold one.
SYSTEM_DIRECTORIES = ("/", "/home", "/media", "/mnt", "/opt", "/root", "/run", "/srv", "/tmp", "/var", "/var/lib",
                      "/var/log", "/var/tmp")
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys", "/usr")
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _link_target(path):
    """What the symbolic link at path points to, or None when path is no link."""
    try:
        return os.readlink(path) if stat.S_ISLNK(os.lstat(path).st_mode) else None
    except FileNotFoundError:
        return None


def _system_directory(path):
    return path in SYSTEM_DIRECTORIES or any(path == tree or path.startswith(tree + "/") for tree in SYSTEM_TREES)


class OpenedDirectory:
    """A directory opened once and then reached only through its descriptor: what replaces the path after the
    check (a link planted, a directory renamed) changes nothing.

    path: where the directory really is, for messages and results. working: the same directory through the
    descriptor (/proc/<our PID>/fd/<fd>), for our own opens and for the programs we run, which run as we do; the
    module's messages and results show path instead (private_state.shown_paths). A directory of the system is
    refused, whatever led to it. missing_ok: a directory that does not exist is no error, and stays unopened (a
    check-mode run before the first backup).
    """

    def __init__(self, given, what, follow_link, create, shown=None, missing_ok=False):
        self.given = os.path.abspath(given)
        self.fd = None
        shown = shown or self.given  # how messages name it
        link = _link_target(self.given)
        if link is not None and not follow_link:
            raise UserError("%s %s is a symbolic link to %s: fleetbackup does not follow it, since whoever can plant "
                            "a link there steers root's writes anywhere. Give the directory itself, or set "
                            "follow_repository_link: true for a link of your own (such as one to an NFS mount)."
                            % (what, shown, link))
        self._refuse_system_directory(what, shown, os.path.realpath(self.given))  # before anything is made
        if link is None and not os.path.lexists(self.given):
            if missing_ok and not create:
                self.path, self.working = shown, self.given
                return
            if create:
                self._make(what, shown)
        try:
            # Only a link seen above is followed: one planted since is refused.
            self.fd = os.open(self.given, DIRECTORY_FLAGS | (0 if link is not None else os.O_NOFOLLOW))
        except FileNotFoundError:
            raise UserError("%s %s does not exist: give the directory that holds one directory per VM, or create "
                            "it (root's, mode 0700)." % (what, shown)) from None
        except OSError as err:
            raise UserError("Cannot open %s %s (%s): it must be a directory, not a symbolic link."
                            % (what, shown, err.strerror)) from None
        self.working = "/proc/%d/fd/%d" % (os.getpid(), self.fd)
        self.path = os.readlink(self.working)
        try:
            self._refuse_system_directory(what, shown, self.path)
            if link is not None:
                self._check_link_target("%s %s, a symbolic link to %s (%s)," % (what, shown, link, self.path))
        except UserError:
            self.close()
            raise
        alias_path(self.working, self.path)

    def _make(self, what, shown):
        try:
            os.makedirs(self.given, mode=0o700)
        except FileExistsError:
            pass  # made meanwhile; it is checked as opened
        except OSError as err:
            raise UserError("Cannot create %s %s (%s): make the repository writable by this user."
                            % (what, shown, err.strerror)) from None

    @staticmethod
    def _refuse_system_directory(what, shown, path):
        if _system_directory(path):
            raise UserError("%s %s is %s, a directory of the system: give a directory of its own for backups, such "
                            "as /backup or /srv/backup." % (what, shown, path))

    def _check_link_target(self, where):
        """A followed link must lead to a directory that only root (or we) can change."""
        info = os.fstat(self.fd)
        if info.st_uid not in (0, os.geteuid()):
            raise UserError("%s belongs to uid %d: a followed link must lead to a directory of root's."
                            % (where, info.st_uid))
        if stat.S_IMODE(info.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
            raise UserError("%s can be written by group or others (mode %o): a followed link must lead to a "
                            "directory only its owner can change." % (where, stat.S_IMODE(info.st_mode)))

    def close(self):
        if self.fd is not None:
            forget_path_alias(self.working)
            os.close(self.fd)
            self.fd = None
