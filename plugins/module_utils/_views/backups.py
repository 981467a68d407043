# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The backups of one VM: one at a time, each started and stopped through its view, under the VM's lock."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import (
    BACKUP_ID_PATTERN,
    check_backup_id,
    request_differences,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.catalog import new_view, view_of
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import GuestFreeze


class VmBackups:
    """Start, stop and describe the backups of the VM that connection vm reaches."""

    def __init__(self, vm):
        self.vm = vm

    def _record(self, backup_id):
        record = self.vm.state.backup()
        return record if record is not None and record["backup_id"] == backup_id else None

    def start(self, backup_id, request, check_mode):
        """(changed, result): a new backup, or the same one again. One backup per VM at a time."""
        vm = self.vm
        check_backup_id(backup_id)
        with vm.state.lock(vm.timeout):
            resumed = vm.recover()
            record = vm.state.backup()
            view = new_view(vm)
            running = view.running_ids() | ({record["backup_id"]} if record else set())
            others = sorted(running - {backup_id})
            foreign = [other for other in others if not BACKUP_ID_PATTERN.match(other)]
            if foreign:
                raise UserError("%s runs on %s: one backup per VM runs at a time. Wait until it ends, then start "
                                "again." % (foreign[0], vm.description))
            if others:
                raise UserError("Backup %s of %s is running: one backup per VM runs at a time. End it with "
                                "fleetbackup.qemu.qemu_backup_stop (backup_id: %s, with this VM's connection "
                                "options), then start again." % (others[0], vm.description, others[0]))
            if backup_id in running:
                return resumed, self._same_backup(record, backup_id, request)
            plan = view.plan(backup_id, request)
            freeze = GuestFreeze(vm.state, backup_id, request["freeze"], lambda: vm.guest_agent(request))
            try:
                freeze.check()  # before anything is created: freeze always without an agent fails here
                if check_mode:
                    return True, dict(plan.result(), **freeze.result())
                return True, view.create(plan, freeze)["result"]
            finally:
                freeze.close()

    def _same_backup(self, record, backup_id, request):
        if record is None or record["backup_id"] != backup_id or not record["complete"] or not self._whole(record):
            raise UserError("Backup '%s' of %s is only partly there (a start was interrupted, or its state is "
                            "gone): run fleetbackup.qemu.qemu_backup_stop with backup_id %s, then start again."
                            % (backup_id, self.vm.description, backup_id))
        differences = request_differences(record["request"], request)
        if differences:
            raise UserError("Backup '%s' of %s already runs with other options (%s differ): use the same options "
                            "to get its result, or stop it and start again."
                            % (backup_id, self.vm.description, ", ".join(differences)))
        return record["result"]

    def _whole(self, record):
        """Whether a backup is all there, and of the view a start makes now: an offline backup of a VM that has
        started since is not the same backup any more (the VM writes what its exports serve)."""
        view = view_of(self.vm, record)
        return view.kind == self.vm.new_view and view.is_whole(record)

    def stop(self, backup_id, discard_checkpoint, check_mode):
        """(changed, Removed, whether the view held)."""
        vm = self.vm
        check_backup_id(backup_id)
        with vm.state.lock(vm.timeout):
            resumed = vm.recover()
            record = self._record(backup_id)
            removed, intact = view_of(vm, record).remove(backup_id, record, discard_checkpoint, check_mode)
            return resumed or bool(removed), removed, intact

    def describe(self):
        """{backup_id: {complete, started}} of the backups running on the VM."""
        record = self.vm.state.backup()
        backups = {backup_id: dict(complete=False, started=None) for backup_id in new_view(self.vm).running_ids()}
        if record is not None:
            backups[record["backup_id"]] = dict(complete=record["complete"], started=record["started"])
        return backups
