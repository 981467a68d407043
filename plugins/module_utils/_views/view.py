# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A backup's point-in-time view of a VM's disks, apart from the connection that reaches the VM.

A view is planned, made, probed and torn down; the connection only says what the VM has (disks, checkpoints, an
agent, a pause). Three views exist: QEMU's fleecing (qmp), libvirt's pull backup, and qemu-nbd over a stopped VM's
images. A start records its view's kind; whatever connection reaches the VM later ends the backup through that
kind (catalog.view_of), so a VM that started or stopped since still gets the right teardown.
"""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, LeftHeld, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import select_disks


class PointInTimeView:
    """One kind of view. Subclasses implement the methods that raise NotImplementedError."""

    kind = None

    def __init__(self, vm):
        self.vm = vm

    def running_ids(self):
        """The ids of the backups of this kind that have anything on the VM."""
        raise NotImplementedError

    def plan(self, backup_id, request):
        """The BackupPlan of a new start, after every check that needs no change to the VM."""
        raise NotImplementedError

    def make(self, plan, freeze, record):
        """Make the planned view inside the GuestFreeze freeze, saving to record what a stop needs as it goes."""
        raise NotImplementedError

    def is_whole(self, record):
        """Whether everything of a completed start is still there."""
        raise NotImplementedError

    def remove(self, backup_id, record, discard_checkpoint, check_mode):
        """(Removed, whether the view held: None when unknown); record: the backup's state record, or None."""
        raise NotImplementedError

    def chosen_disks(self, request):
        """The disks the start backs up: those named in request's disks, else every writable one."""
        try:
            chosen = select_disks(self.vm.disks(), request["disks"])
        except LookupError as err:
            raise UserError(str(err)) from None
        if not chosen:
            raise UserError("%s has no writable disk with a medium to back up; name disks explicitly."
                            % self.vm.description)
        return chosen

    def new_record(self, plan):
        """The state record of a start, saved before anything exists: a stop finds all of it by this record."""
        return dict(kind=self.kind, backup_id=plan.backup_id, tag=plan.tag, request=plan.request, complete=False,
                    checkpoint=plan.checkpoint, disks=plan.disks, nbd_socket=plan.nbd_socket, socket_identity=None,
                    result=plan.result(), started=int(time.time()))

    def create(self, plan, freeze):
        """The planned backup, made; its state record. On failure, everything it made is removed again."""
        record = self.new_record(plan)
        self.vm.state.save_backup(record)
        try:
            self.make(plan, freeze, record)
        except (FleetbackupError, OSError) as err:
            self._roll_back(plan.backup_id, err)
        return record

    def _roll_back(self, backup_id, err):
        held = "; %s" % err.still if isinstance(err, LeftHeld) else ""
        try:
            self.remove(backup_id, self.vm.state.backup(), discard_checkpoint=True, check_mode=False)
        except (FleetbackupError, OSError) as cleanup_error:
            raise UserError("Starting backup '%s' of %s failed: %s. Cleaning up failed too: %s"
                            % (backup_id, self.vm.description, err, cleanup_error)) from None
        raise UserError("Starting backup '%s' of %s failed: %s. Everything it had created was removed%s."
                        % (backup_id, self.vm.description, err, held)) from None
