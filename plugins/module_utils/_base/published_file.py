# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Files we publish for a program that runs as another user (node_exporter's textfile collector): readable by all,
replaced atomically, in a directory of the user's that only root or we can change, opened once.

The directory is opened without following a link and then reached only through its descriptor: whoever owns a
directory above it (Debian's /var/lib/prometheus belongs to the prometheus user) cannot swap it for a link that
steers our write elsewhere.
"""

from __future__ import annotations

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    alias_path, check_plain_name, check_trusted_directory, forget_path_alias, shown_paths, write_atomic)

# Readable by the reader that runs as another user; written only by us.
PUBLISHED_MODE = 0o644


class PublishedDirectory:
    """A directory that another program reads, opened and checked at once: a refusal comes before any write."""

    def __init__(self, path, option, purpose):
        """option: what the user set to name it; purpose: what such a directory is, for the message that refuses."""
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UserError("The directory %s of %s does not exist: create it (root's, mode 0755), or choose %s."
                            % (self.path, option, purpose)) from None
        except OSError as err:
            raise UserError("Cannot open %s %s (%s): give the directory itself, not a symbolic link to it."
                            % (option, self.path, err.strerror)) from None
        self.working = "/proc/%d/fd/%d" % (os.getpid(), self.fd)
        alias_path(self.working, self.path)
        try:
            check_trusted_directory(self.working, option, purpose)
        except UserError as err:
            message = shown_paths(str(err))  # before close() forgets how to show the descriptor's path
            self.close()
            raise UserError(message) from None

    def publish(self, name, content):
        """Replace file `name` with the bytes content: a fresh file, synced, then renamed over the old one."""
        try:
            write_atomic(self.working, check_plain_name(name, "File name"), content, mode=PUBLISHED_MODE)
        except UserError as err:
            raise UserError(shown_paths(str(err))) from None
        return os.path.join(self.path, name)

    def close(self):
        if self.fd is not None:
            forget_path_alias(self.working)
            os.close(self.fd)
            self.fd = None
