# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A VM reached over a QMP socket of its own: the QMP implementation of VmConnection."""

from __future__ import annotations

import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import check_trusted_directory
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import FLEECING, FLEECING_VIEW, OFFLINE, OFFLINE_EXPORT_VIEW, VmConnection
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import list_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.seen_disks import remember_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import (
    FreezeUnavailable,
    SocketAgent,
    thaw_abandoned_freeze,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpClient
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.identity import qmp_vm_identity, qmp_vm_key
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.pause import resume_abandoned_pause
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState


class QmpVm(VmConnection):
    """A running QEMU on its QMP socket; connect() before use (open_qmp_vm does)."""

    # An offline backup of its images may still run when the VM started during it.
    views = {FLEECING: FLEECING_VIEW, OFFLINE: OFFLINE_EXPORT_VIEW}
    new_view = FLEECING

    def __init__(self, qmp_socket, timeout, state_dir, registry, read_only=False):
        state = VmState(state_dir, qmp_vm_key(qmp_socket), "QMP socket %s" % qmp_socket, read_only)
        super().__init__(state, registry, timeout)
        self.description = "the VM on QMP socket %s" % qmp_socket
        self.socket_path = qmp_socket
        self.qmp = QmpClient(qmp_socket, timeout)

    def connect(self):
        self.qmp.connect()
        return self

    def close(self):
        self.qmp.close()

    def undo_abandoned(self):
        # The vCPUs first: the agent of a paused guest cannot answer.
        messages = [resume_abandoned_pause(self.qmp, self.state),
                    thaw_abandoned_freeze(self.state, lambda agent: SocketAgent(agent["socket"], self.timeout))]
        return [message for message in messages if message]

    def guest_agent(self, request):
        path = request["guest_agent_socket"]
        if not path:
            raise FreezeUnavailable("no guest_agent_socket was given, the socket of the VM's virtio-serial port "
                                    "org.qemu.guest_agent.0")
        check_trusted_directory(os.path.dirname(path), "guest_agent_socket", "the guest agent's socket")
        if os.path.lexists(path) and not self._serves_chardev(path):
            # Another VM's agent would freeze that guest, and call this backup application-consistent.
            raise UserError("guest_agent_socket %s is no socket of this QEMU's character devices (query-chardev): "
                            "give the path of this VM's own org.qemu.guest_agent.0 chardev." % path)
        status = self.qmp.execute("query-status")["status"]
        if status != "running":
            raise FreezeUnavailable("the VM is %s: its guest agent cannot answer, and its file systems cannot change"
                                    % status)
        return SocketAgent(path, request["freeze_timeout"])

    def _serves_chardev(self, path):
        """Whether path is the same socket file as one of this QEMU's unix socket chardevs."""
        cwd = "/proc/%d/cwd" % self.qmp.peer_pid()  # a relative chardev path is QEMU's own
        for chardev in self.qmp.execute("query-chardev"):
            address = chardev["filename"]
            if address.startswith("disconnected:"):
                address = address[len("disconnected:"):]
            if address.startswith("unix:"):
                try:
                    if os.path.samefile(path, os.path.join(cwd, address[len("unix:"):].split(",")[0])):
                        return True
                except OSError:
                    continue
        return False

    def disks(self):
        disks = list_disks(self.qmp)
        if not self.state.read_only:
            name, uuid = qmp_vm_identity(self.qmp, self.socket_path)
            remember_disks(self.state, disks, dict(qmp_socket=self.socket_path, name=name, uuid=uuid))
        return disks

    def set_bitmaps(self, name, disks, present):
        if present:
            self.qmp.transaction([("block-dirty-bitmap-add", dict(node=d.node, name=name, persistent=True))
                                  for d in disks])
        else:
            self.qmp.transaction([("block-dirty-bitmap-remove", dict(node=d.node, name=name)) for d in disks])
