# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Our own state on a host: directories that only we can write, and files that only we create.

Every directory is owned by us with mode 0700. Every file is created with O_EXCL|O_NOFOLLOW and mode 0600
and replaced atomically. A path is never taken from a file's contents: callers name a plain file inside
one of these directories, and a name that is not plain is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import stat
import time
from contextlib import contextmanager

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError

PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,254}$")
LOCK_POLL = 0.05


# Paths through our descriptors (/proc/<pid>/fd/<n>) and the real paths they stand for, for what the user reads.
_PATH_ALIASES = {}


def alias_path(working, shown):
    """Show `shown` wherever a message or result of this process names `working`."""
    _PATH_ALIASES[working] = shown


def forget_path_alias(working):
    _PATH_ALIASES.pop(working, None)


def shown_paths(value):
    """value (a string, or lists and dicts of them) with every aliased path as the user knows it."""
    if isinstance(value, str):
        for working, shown in sorted(_PATH_ALIASES.items(), key=lambda item: -len(item[0])):
            # Wherever it stands, not only before a "/": not followed by a digit, which would be another descriptor.
            value = re.sub(re.escape(working) + r"(?!\d)", lambda _match, shown=shown: shown, value)
        return value
    if isinstance(value, dict):
        return {key: shown_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [shown_paths(item) for item in value]
    return value


def is_plain_name(name):
    """Whether name is one path component of our own making: no '/', no '..', no leading dot."""
    return isinstance(name, str) and bool(PLAIN_NAME.match(name)) and ".." not in name


def check_plain_name(name, what):
    """name, if it is a plain name (is_plain_name); else UserError."""
    if not is_plain_name(name):
        raise UserError("%s %r is not a plain file name (letters, digits and _.:@+- only, not starting with a "
                        "dot): fix it where it was written (inventory, manifest or option)." % (what, name))
    return name


def others_can_write(mode):
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def check_trusted_directory(path, option, purpose):
    """A user-given directory in which nobody but root and us can swap what we create there."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError("The directory %s of %s does not exist: create it, or choose a directory with %s."
                        % (path, option, purpose)) from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError("%s %s is not a directory." % (option, path))
    if info.st_uid not in (0, os.geteuid()):
        raise UserError("The directory %s of %s belongs to uid %d, who could change it under the backup: use a "
                        "directory owned by root." % (path, option, info.st_uid))
    if others_can_write(info.st_mode) and not info.st_mode & stat.S_ISVTX:
        raise UserError("The directory %s of %s can be written by other users and is not sticky (mode %o): use a "
                        "private directory, or one with the sticky bit like /var/tmp."
                        % (path, option, stat.S_IMODE(info.st_mode)))


class PrivateDir:
    """A directory that only this user can enter or change; option: what the user set to name it, for messages."""

    def __init__(self, path, option="state_dir"):
        self.path = os.path.abspath(path)
        self.option = option

    def __repr__(self):
        return "PrivateDir(%r)" % self.path

    def ensure(self):
        """Create the directory (mode 0700) if it is missing; refuse one that someone else could change."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as err:
            raise UserError("Cannot create the private directory %s (%s): run as root, or choose another "
                            "%s." % (self.path, err.strerror, self.option)) from None
        return self.check()

    def check(self):
        """Refuse the directory, if it exists, when anyone but this user could enter or change it."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return self
        if not stat.S_ISDIR(info.st_mode):
            raise UserError("%s is not a directory (a symlink?): fleetbackup keeps its state only in a real "
                            "directory of its own. Remove it, or choose another %s." % (self.path, self.option))
        if info.st_uid != os.geteuid():
            raise UserError("%s belongs to uid %d, not to this user (uid %d): fleetbackup keeps its state only in "
                            "a directory of its own. Choose another %s."
                            % (self.path, info.st_uid, os.geteuid(), self.option))
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise UserError("%s has mode %o: others could have put files there. Check what it holds, then "
                            "chmod 0700 it, or choose another %s."
                            % (self.path, stat.S_IMODE(info.st_mode), self.option))
        return self

    def prepare(self, create=True):
        """ensure() it, or for a read-only run only check() it."""
        return self.ensure() if create else self.check()

    def child(self, name, create=True):
        path = os.path.join(self.path, check_plain_name(name, "Directory name"))
        return PrivateDir(path, self.option).prepare(create)

    def path_of(self, name):
        return os.path.join(self.path, check_plain_name(name, "File name"))

    def read_json(self, name):
        """The JSON in file `name`, or None when there is none; a file we did not create is refused."""
        try:
            # O_NONBLOCK: a FIFO in its place must not hang us; fstat below refuses it.
            fd = os.open(self.path_of(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise UserError("Cannot open %s (%s): it is not a file that fleetbackup made; remove it after "
                            "checking what it is." % (self.path_of(name), err.strerror)) from None
        with os.fdopen(fd) as stream:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or others_can_write(info.st_mode):
                raise UserError("%s is not a file that fleetbackup made (owner uid %d, mode %o): remove it after "
                                "checking what it is." % (self.path_of(name), info.st_uid,
                                                          stat.S_IMODE(info.st_mode)))
            try:
                return json.load(stream)
            except ValueError as err:
                raise UserError("%s is damaged (%s): remove it after checking that no backup uses it."
                                % (self.path_of(name), err)) from None

    def write_json(self, name, data, durable=True):
        write_json_atomic(self.path, check_plain_name(name, "File name"), data, durable)

    def remove(self, name):
        """Remove file `name`; True when it was there."""
        return remove_file(self.path_of(name))

    @contextmanager
    def lock(self, name, timeout, holder_description):
        """Hold an exclusive lock on file `name` for the block; wait at most timeout seconds for it."""
        fd = os.open(self.path_of(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise UserError("%s is not a lock file that fleetbackup made: remove it after checking what it is."
                                % self.path_of(name))
            if not flock_within(fd, timeout):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                raise UserError("%s is busy: %s holds it for more than %ss. Wait for it to finish."
                                % (holder_description, holder, timeout))
            os.ftruncate(fd, 0)
            os.pwrite(fd, ("fleetbackup pid %d on %s" % (os.getpid(), socket.gethostname())).encode(), 0)
            yield
        finally:
            os.close(fd)


def flock_within(fd, seconds):
    """Take an exclusive flock on fd, waiting at most `seconds`; whether it was taken."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(LOCK_POLL)


class CreatedFile:
    def __init__(self, path, fd):
        self.path = path
        self.fd = fd


def create_exclusive(directory, name, flags=os.O_WRONLY, mode=0o600):
    """Create a new file `name` in directory, with mode (0600) whatever the umask, never through a symlink."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UserError("%s already exists: remove it after checking that nothing uses it." % path) from None
    os.fchmod(fd, mode)
    return CreatedFile(path, fd)


def write_json_atomic(directory, name, data, durable=True):
    """Replace file `name` in directory atomically with data as JSON, through a fresh 0600 file.

    durable: also make it survive a crash (two fsyncs); without, readers still never see a torn file.
    """
    write_atomic(directory, name, json.dumps(data, indent=1, sort_keys=True).encode(), durable)


def write_atomic(directory, name, content, durable=True, mode=0o600):
    """Replace file `name` in directory atomically with the bytes content, through a fresh file of that mode."""
    temporary = create_exclusive(directory, ".%s.%s" % (name, secrets.token_hex(4)), mode=mode)
    try:
        with os.fdopen(temporary.fd, "wb") as stream:
            stream.write(content)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.rename(temporary.path, os.path.join(directory, name))
    except BaseException:
        remove_file(temporary.path)
        raise
    if durable:
        sync_directory(directory)


def read_regular_file(path, what, limit=None, missing_ok=False):
    """The bytes of the regular file at path, never through a link or from a FIFO; at most limit bytes.

    None when it is missing and missing_ok; UserError naming `what` otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError("%s %s does not exist." % (what, path)) from None
    except OSError as err:
        raise UserError("Cannot read %s %s (%s): it must be a plain file." % (what, path, err.strerror)) from None
    with os.fdopen(fd, "rb") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise UserError("%s %s is not a regular file." % (what, path))
        content = stream.read() if limit is None else stream.read(limit + 1)
    if limit is not None and len(content) > limit:
        raise UserError("%s %s is larger than %d bytes." % (what, path, limit))
    return content


def remove_file(path):
    """Unlink path if it is there (a symlink is removed, never followed); True when it was."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def sync_directory(path):
    """Make renames and unlinks in path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(path, follow=False):
    """[device, inode] of the regular file at path (through a symlink with follow), else None."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return [info.st_dev, info.st_ino] if stat.S_ISREG(info.st_mode) else None


def utc(seconds):
    """A time for messages: 2026-11-29 02:00:00 UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
