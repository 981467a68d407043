# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VM reached over a QMP socket of its own: the QMP implementation of VmConnection."""

from __future__ import annotations

import hashlib
import os

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import BackupPlan, check_socket_path
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import (
    FreezeUnavailable,
    SocketAgent,
    thaw_abandoned_freeze,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import SERVER_FILES, read_credentials
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.offline_export import recorded_disks, remember_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.vm import OfflineVm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import check_trusted_directory, utc
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpClient, QmpCommandError, QmpUnreachable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.fleecing import (
    backup_is_whole,
    check_fleecing_support,
    resume_abandoned_pause,
    Teardown,
    running_backup_ids,
    start_backup,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.scratch import (
    check_scratch_dir,
    scratch_bytes,
    scratch_shares,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import VmConnection
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import list_disks, select_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState


NO_UUID = "00000000-0000-0000-0000-000000000000"


def qmp_vm_identity(client, socket_path):
    """(name, uuid) a running QEMU reports: its -name, else its socket's directory; its -uuid, else None."""
    name = client.execute("query-name").get("name")
    uuid = client.execute("query-uuid")["UUID"]
    return name or os.path.basename(os.path.dirname(os.path.abspath(socket_path))), (
        None if uuid == NO_UUID else uuid)


def qmp_vm_key(qmp_socket):
    """The private-state key of the VM behind a QMP socket."""
    return "qmp-" + hashlib.sha256(os.path.realpath(qmp_socket).encode()).hexdigest()[:12]


class QmpVm(VmConnection):
    def __init__(self, qmp_socket, timeout, state_dir, registry, read_only=False):
        state = VmState(state_dir, qmp_vm_key(qmp_socket), "QMP socket %s" % qmp_socket, read_only)
        super().__init__(state, registry, timeout)
        self.description = "the VM on QMP socket %s" % qmp_socket
        self.socket_path = qmp_socket
        self.qmp = QmpClient(qmp_socket, timeout)

    def __enter__(self):
        """This connection; or, when no QEMU serves the socket, the stopped VM's images as last seen running."""
        try:
            self.qmp.connect()
        except QmpUnreachable:
            recorded = recorded_disks(self.state)
            if recorded is None:
                raise
            images, seen = recorded
            return OfflineVm(self.state, self.registry, self.timeout, "the stopped VM of QMP socket %s (its disks "
                             "as fleetbackup saw them running at %s)" % (self.socket_path, utc(seen)), images)
        return self

    def __exit__(self, *exc_info):
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

    def running_backup_ids(self):
        return running_backup_ids(self.qmp)

    def plan(self, backup_id, request, check_mode):
        check_fleecing_support(self.qmp)
        try:
            chosen = select_disks(self.disks(), request["disks"])
        except LookupError as err:
            raise UserError(str(err)) from None
        if not chosen:
            raise UserError("%s has no writable disk with a medium to back up; name disks explicitly."
                            % self.description)
        nbd_socket = None
        if request.get("nbd_tcp"):
            if request["nbd_tcp"]["tls_dir"]:
                read_credentials(request["nbd_tcp"]["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")
            check_socket_path(self.state.default_socket, given=False)  # where the stop serves the probes
        else:
            nbd_socket = request["nbd_socket"] or self.state.default_socket
            check_socket_path(nbd_socket, given=bool(request["nbd_socket"]))
        shares = scratch_shares(scratch_bytes(request["scratch_size"], sum(disk.size for disk in chosen)),
                                [disk.size for disk in chosen])
        scratch_dir = request["scratch_dir"] or self.state.default_scratch_dir
        check_scratch_dir(scratch_dir, sum(shares), ours=not request["scratch_dir"])
        plan = BackupPlan(backup_id, chosen, request, self.registry, nbd_socket)
        plan.scratch_dir = scratch_dir
        for disk, share in zip(plan.disks, shares):
            disk["scratch_room"] = share
        return plan

    def is_whole(self, record):
        return backup_is_whole(self.qmp, record)

    def create_backup(self, plan, freeze):
        return start_backup(self.qmp, self.state, plan, self.registry, freeze)

    def remove_backup(self, backup_id, discard_checkpoint, check_mode):
        teardown = Teardown(self.qmp, self.state, backup_id, discard_checkpoint)
        try:
            intact = teardown.intact()
        except (UserError, QmpCommandError) as err:
            intact = None  # unknown; the teardown must go on all the same
            self.notes.append("Whether the point in time held could not be read (%s): the backup is removed, and its "
                              "copies' own probe checks are what tell." % err)
        if not check_mode:
            teardown.run(self.registry)
        if teardown.scratch_images and self.qmp.execute("query-status")["status"] != "running":
            self.notes.append("The VM is not running: QEMU lets go of the backup's scratch images, and their space, "
                              "only once it runs again.")
        for path in teardown.foreign_sockets:
            self.notes.append("QEMU names %s as this backup's socket, outside fleetbackup's own directory: it was "
                              "left alone; remove it if nothing uses it." % path)
        return teardown.removed, intact

    def set_bitmaps(self, name, disks, present):
        if present:
            self.qmp.transaction([("block-dirty-bitmap-add", dict(node=d.node, name=name, persistent=True))
                                  for d in disks])
        else:
            self.qmp.transaction([("block-dirty-bitmap-remove", dict(node=d.node, name=name)) for d in disks])
