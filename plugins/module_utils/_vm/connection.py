# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The seam between the modules and a VM: one interface, answered over QMP (qmp_vm), by libvirt (libvirt_vm), or,
for a VM that is not running, on its image files (offline_vm).

Modules ask a VmConnection for the disks, start and stop backups, and add or remove checkpoints; they
never see which connection answers. Each connection keeps its state under <state_dir>/vms/<key>/ and
serialises the changes it makes to a VM with that directory's lock.
"""

from __future__ import annotations

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import (
    BACKUP_ID_PATTERN,
    check_backup_id,
    request_differences,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import GuestFreeze
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.offline_export import OFFLINE, remove_offline_backup


class VmConnection:
    """A VM's disks, checkpoints and backups. Subclasses implement the methods that raise NotImplementedError."""

    # Used in messages: how a user names this VM in a module's options.
    description = None

    def __init__(self, state, registry, timeout):
        self.state = state
        self.registry = registry
        self.timeout = timeout
        self.notes = []  # for the user, as warnings

    def recover(self):
        """Undo what a dead run of ours left on the VM (a vCPU pause, a file system freeze), noting it; whether
        anything was undone.

        Not in check mode: a read-only run changes nothing.
        """
        undone = [] if self.state.read_only else self.undo_abandoned()
        self.notes.extend(undone)
        return bool(undone)

    def recover_now(self):
        """recover() for a module that changes nothing else: under the VM's lock."""
        with self.state.lock(self.timeout):
            return self.recover()

    def undo_abandoned(self):
        """Undo what a dead run of ours left on the VM; messages saying what was done."""
        raise NotImplementedError

    def disks(self):
        """[vm_disks.Disk] with their checkpoints."""
        raise NotImplementedError

    def running_backup_ids(self):
        """The ids of the backups that have anything on this VM."""
        raise NotImplementedError

    def is_whole(self, record):
        """Whether everything of a completed start is still there on the VM."""
        raise NotImplementedError

    def create_backup(self, plan, freeze):
        """Create the planned backup, inside the GuestFreeze freeze at its point in time; its state record.

        On failure, removes everything it created.
        """
        raise NotImplementedError

    def guest_agent(self, request):
        """The guest agent that freezes the guest (guest_freeze's agent interface); FreezeUnavailable says why
        there is none."""
        raise NotImplementedError

    def remove_backup(self, backup_id, discard_checkpoint, check_mode):
        """(what was removed, whether the point-in-time view held)."""
        raise NotImplementedError

    def set_bitmaps(self, name, disks, present):
        """Add (present) or remove the checkpoint's bitmaps on disks, all at once."""
        raise NotImplementedError

    def plan(self, backup_id, request, check_mode):
        """The BackupPlan of a new start, after every check that needs no change to the VM."""
        raise NotImplementedError

    def start_backup(self, backup_id, request, check_mode):
        """(changed, result): a new backup, or the same one again. One backup per VM at a time."""
        check_backup_id(backup_id)
        with self.state.lock(self.timeout):
            resumed = self.recover()
            record = self.state.backup()
            running = self.running_backup_ids() | ({record["backup_id"]} if record else set())
            others = sorted(running - {backup_id})
            foreign = [other for other in others if not BACKUP_ID_PATTERN.match(other)]
            if foreign:
                raise UserError("%s runs on %s: one backup per VM runs at a time. Wait until it ends, then start "
                                "again." % (foreign[0], self.description))
            if others:
                raise UserError("Backup %s of %s is running: one backup per VM runs at a time. End it with "
                                "fleetbackup.qemu.qemu_backup_stop (backup_id: %s, with this VM's connection "
                                "options), then start again." % (others[0], self.description, others[0]))
            if backup_id in running:
                return resumed, self._same_backup(record, backup_id, request)
            plan = self.plan(backup_id, request, check_mode)
            freeze = GuestFreeze(self.state, backup_id, request["freeze"], lambda: self.guest_agent(request))
            try:
                freeze.check()  # before anything is created: freeze always without an agent fails here
                if check_mode:
                    return True, dict(plan.result(), **freeze.result())
                return True, self.create_backup(plan, freeze)["result"]
            finally:
                freeze.close()

    def _same_backup(self, record, backup_id, request):
        if record is None or record["backup_id"] != backup_id or not record["complete"] or not self.is_whole(record):
            raise UserError("Backup '%s' of %s is only partly there (a start was interrupted, or its state is "
                            "gone): run fleetbackup.qemu.qemu_backup_stop with backup_id %s, then start again."
                            % (backup_id, self.description, backup_id))
        differences = request_differences(record["request"], request)
        if differences:
            raise UserError("Backup '%s' of %s already runs with other options (%s differ): use the same options "
                            "to get its result, or stop it and start again."
                            % (backup_id, self.description, ", ".join(differences)))
        return record["result"]

    def describe_backups(self):
        """{backup_id: {complete, started}} of the backups running on the VM."""
        record = self.state.backup()
        backups = {backup_id: dict(complete=False, started=None) for backup_id in self.running_backup_ids()}
        if record is not None:
            backups[record["backup_id"]] = dict(complete=record["complete"], started=record["started"])
        return backups

    def change_checkpoint(self, name, disks, present):
        """Add (present) or remove checkpoint name on disks, all at once, and keep the registry in step."""
        with self.state.lock(self.timeout):
            self.set_bitmaps(name, disks, present)
            if present:
                self.registry.record(disks, name)
            else:
                self.registry.forget([disk.filename for disk in disks], name)

    def restore_checkpoint(self, name, definition, check_mode):
        """(changed, disks): give the VM's manager back checkpoint `name` from its recorded definition."""
        raise UserError("%s keeps its checkpoints in its images alone: a definition applies to libvirt domains."
                        % self.description)

    def remove_checkpoint(self, name, filenames):
        """Remove checkpoint `name` from the disks of these image files, where it still is."""
        disks = [disk for disk in self.disks() if disk.filename in filenames and name in disk.bitmaps]
        if disks:
            self.set_bitmaps(name, disks, present=False)

    def stop_backup(self, backup_id, discard_checkpoint, check_mode):
        """(changed, what was removed, whether the view held)."""
        check_backup_id(backup_id)
        with self.state.lock(self.timeout):
            resumed = self.recover()
            record = self.state.backup()
            if record is not None and record["backup_id"] == backup_id and record.get("kind") == OFFLINE:
                # A backup of the images while the VM was stopped, whether or not it runs now.
                removed, intact = remove_offline_backup(self, record, discard_checkpoint, check_mode)
            else:
                removed, intact = self.remove_backup(backup_id, discard_checkpoint, check_mode)
            return resumed or any(removed.values()), removed, intact

    def forget_dead_backup(self, backup_id, discard_checkpoint, check_mode):
        """When the VM is gone, remove what is left of its backup: socket and state. None if none is known."""
        with self.state.lock(self.timeout):
            record = self.state.backup()
            if record is None or record["backup_id"] != backup_id:
                return None
            return self.forget_backup_state(record, discard_checkpoint, check_mode)

    def forget_backup_state(self, record, discard_checkpoint, check_mode):
        """Remove what a backup of a VM that stopped since left outside QEMU: its socket and state."""
        checkpoint = record["checkpoint"] if discard_checkpoint else None
        ours = record["socket_identity"] and self.state.holds_socket(record["nbd_socket"], record["socket_identity"])
        removed = dict(job=False, exports=[], nodes=[], nbd_server=False, objects=[], checkpoint=checkpoint,
                       state_file=True, files=[record["nbd_socket"]] if ours else [])
        if not check_mode:
            if checkpoint:
                self.registry.forget([d["filename"] for d in record["disks"] if d["checkpoint"]], checkpoint)
            if ours:
                os.unlink(record["nbd_socket"])
            self.state.forget_backup()
            self.state.forget_pause()
            self.state.forget_freeze()
        return removed
