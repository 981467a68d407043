# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The lease of a VM's repository: which run works on it now, across hosts, and until when."""

from __future__ import annotations

import json
import os
import socket
import stat
from contextlib import contextmanager

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import flock_within, utc
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive

LEASE = "lock"
LEASE_LOCK_WAIT = 30
# The shortest lease: a run renews it only between its steps.
MIN_TTL = 60


def check_ttl(ttl):
    """Before anything is created: a lease too short to last from one step to the next is refused."""
    if ttl < MIN_TTL:
        raise UserError("lock_ttl must be at least %d seconds: the run renews the lease only between its steps."
                        % MIN_TTL)


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

    def take(self, run_id, holder, ttl, now, owner=None, work=None):
        """Take the lease for run_id, or renew it; UserError naming the holder when another live run has it.

        owner: the process that is the whole run (this_process()), when one is: once it is gone, its lease is free
        at once. work: what the run writes ({backup_id, name}), so that a run taking over cleans up after it.
        """
        with self._locked() as (fd, current):
            if current and current["run_id"] != run_id and (
                    _owner_alive_here(current) or (current["expires"] > now and not _owner_gone(current))):
                raise UserError(
                    "The repository of %s (%s) is locked by another run: %s, run %s, since %s, until %s unless it "
                    "renews. One run per VM works on a repository at a time; wait for it. A run that died frees the "
                    "lock when it expires." % (self.repository.vm, self.repository.path, current["holder"],
                                               current["run_id"], utc(current["taken"]), utc(current["expires"])))
            taken = current["taken"] if current and current["run_id"] == run_id else now
            lease = dict(run_id=run_id, holder=holder, host=socket.gethostname(), taken=taken, expires=now + ttl,
                         owner=owner, work=work)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(lease, sort_keys=True).encode(), 0)
            os.fsync(fd)
            return dict(lease, taken_over=current if current and current["run_id"] != run_id else None)

    def check(self, run_id, now):
        """UserError unless run_id holds the lease now: a run must not write once another has taken over."""
        with self._locked() as (_fd, current):
            self._check_held(current, run_id, now)

    def renew(self, run_id, ttl, now):
        """Keep run_id's lease, as it is, for ttl more seconds from now; UserError unless run_id holds it now."""
        with self._locked() as (fd, current):
            self._check_held(current, run_id, now)
            current["expires"] = max(current["expires"], now + ttl)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(current, sort_keys=True).encode(), 0)
            os.fsync(fd)

    def _check_held(self, current, run_id, now):
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

    def work(self, run_id):
        """The work that run_id, which must hold the lease, said it does."""
        return self._held_by(run_id).get("work")

    def owner(self, run_id):
        """The process that holds run_id's lease, if one does."""
        return self._held_by(run_id).get("owner")

    def _held_by(self, run_id):
        with self._locked() as (_fd, current):
            return current if current and current["run_id"] == run_id else {}

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


def _owner_gone(lease):
    """Whether the lease names its run's process, on this host, and that process has ended."""
    owner = lease.get("owner")
    return bool(owner) and owner.get("host") == socket.gethostname() and not process_alive(owner)


def _owner_alive_here(lease):
    """Whether the lease names its run's process, on this host, and that process runs: its lease is never lost."""
    owner = lease.get("owner")
    return bool(owner) and owner.get("host") == socket.gethostname() and process_alive(owner)
