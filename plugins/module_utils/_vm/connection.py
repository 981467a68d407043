# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""How a VM is reached: one interface, answered over QMP (qmp/), by libvirt (libvirt/), or, for a VM that is not
running, on its image files (offline/).

A connection says what the VM has: its disks, its checkpoints, its guest agent, and what a dead run of ours left
held on it. How a backup's point-in-time view is made and torn down is the views' (_views/), which a connection
lists by kind. Each connection keeps its state under <state_dir>/vms/<key>/ and serialises the changes it makes to
a VM with that directory's lock.
"""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError

# The kinds of point-in-time view a start records, and so the kind whose teardown its stop needs.
FLEECING = "fleecing"
LIBVIRT_PULL = "libvirt-pull"
OFFLINE = "offline"
# The views (_views.catalog) that can end a backup of a kind, by who reaches the VM now.
FLEECING_VIEW = "fleecing"
ENDED_FLEECING_VIEW = "ended fleecing"
LIBVIRT_PULL_VIEW = "libvirt pull"
OFFLINE_EXPORT_VIEW = "offline export"


class CheckpointGone(UserError):
    """A checkpoint cannot be given back to the VM's manager: its bitmaps are gone, so the next backup is full."""


class VmConnection:
    """A reached VM. Subclasses implement the methods that raise NotImplementedError, and list their views."""

    # Used in messages: how a user names this VM in a module's options.
    description = None
    # {recorded kind: the view that ends it through this connection}, its manager's own first (_views.catalog).
    views = {}
    # The kind of view a start makes now.
    new_view = None
    # Whether the VM's manager keeps checkpoint definitions apart from the bitmaps, which it can lose (libvirt).
    keeps_checkpoint_definitions = False

    def __init__(self, state, registry, timeout):
        self.state = state
        self.registry = registry
        self.timeout = timeout
        self.notes = []  # for the user, as warnings

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Let go of the VM's manager."""

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
        """[_vm.disks.Disk] with their checkpoints."""
        raise NotImplementedError

    def guest_agent(self, request):
        """The guest agent that freezes the guest (guest_freeze's agent interface); FreezeUnavailable says why
        there is none."""
        raise NotImplementedError

    def set_bitmaps(self, name, disks, present):
        """Add (present) or remove the checkpoint's bitmaps on disks, all at once."""
        raise NotImplementedError

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
