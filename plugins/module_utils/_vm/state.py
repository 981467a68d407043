# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""What fleetbackup keeps about one VM between module runs, in <state_dir>/vms/<vm key>/.

The running backup (one per VM), the records of a vCPU pause and of a guest file system freeze in progress,
the default NBD socket, and a lock that serialises the modules that change the VM. Nothing here can be
written by anyone but us.
"""

from __future__ import annotations

import os
import stat
from contextlib import nullcontext

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive, this_process

BACKUP = "backup.json"
PAUSED = "paused.json"
FROZEN = "frozen.json"
NBD_SOCKET = "nbd.sock"


def registry_dir(state_dir):
    return os.path.join(state_dir, "checkpoints")


class VmState:
    """One VM's directory. Read-only (for check mode), it creates nothing: a missing directory is no state."""

    def __init__(self, state_dir, key, description, read_only=False):
        self.description = description
        self.read_only = read_only
        create = not read_only
        root = PrivateDir(state_dir).prepare(create)
        self.default_scratch_dir = root.child("scratch", create).path
        self.dir = root.child("vms", create).child(key, create)

    def lock(self, timeout):
        """Serialise start, stop and checkpoint changes of this VM across processes."""
        if self.read_only:
            return nullcontext()
        return self.dir.lock("lock", timeout, "VM %s" % self.description)

    @property
    def default_socket(self):
        return self.dir.path_of(NBD_SOCKET)

    def backup(self):
        """The state of the running backup, or None."""
        return self.dir.read_json(BACKUP)

    def save_backup(self, data):
        self.dir.write_json(BACKUP, data)

    @staticmethod
    def holds_socket(path, identity):
        """Whether path still holds the very socket a start bound there: its device and inode, not just a name."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return False
        return stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == tuple(identity)

    def forget_backup(self):
        self.dir.remove(BACKUP)

    def record_pause(self, backup_id):
        """Written before the vCPUs stop: whoever finds it after we died knows the pause was ours."""
        self._record_hold(PAUSED, backup_id)

    def forget_pause(self):
        self.dir.remove(PAUSED)

    def abandoned_pause(self):
        """The pause record of a run that died in its pause window, or None (no record, or its run still lives)."""
        return self._abandoned(PAUSED)

    def record_freeze(self, backup_id, agent):
        """Written before the guest's file systems are frozen; agent: how to reach the guest agent to thaw them."""
        self._record_hold(FROZEN, backup_id, agent=agent)

    def forget_freeze(self):
        self.dir.remove(FROZEN)

    def abandoned_freeze(self):
        """The freeze record of a run that died while the guest may have been frozen, or None."""
        return self._abandoned(FROZEN)

    def _record_hold(self, name, backup_id, **details):
        self.dir.write_json(name, dict(backup_id=backup_id, owner=this_process(), **details))

    def _abandoned(self, name):
        record = self.dir.read_json(name)
        if record is None or process_alive(record["owner"]):
            return None
        return record
