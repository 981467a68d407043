"""Which view ends a backup: the kind its start recorded, reached through whatever connection reaches the VM now."""

import os

import pytest

from fleecing_support import start, start_request, state_files, stop, vm_dir
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.seen_disks import DISKS
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpUnreachable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import BACKUP, VmState

GONE = "Nothing listens on the QMP socket (qmp_socket): the VM behind it has stopped."


def qemu_gone(fake, monkeypatch):
    def refuse():
        raise QmpUnreachable(GONE)
    monkeypatch.setattr(fake, "connect", refuse)


def test_a_fleecing_backup_whose_vm_stopped_since_is_ended_on_what_is_left(fake, vm, tmp_path, monkeypatch):
    start(vm, "b1", start_request())
    qemu_gone(fake, monkeypatch)
    stopped = stop(vm, "b1")
    assert stopped["changed"] is True and stopped["intact"] is None and stopped["removed"]["state_file"] is True
    assert any(warning.startswith("QEMU no longer runs the stopped VM of QMP socket %s" % fake.socket_path)
               for warning in stopped["warnings"])
    assert state_files(tmp_path) == []


def test_a_vm_never_seen_running_is_reached_only_to_end_the_backup_it_recorded(fake, vm, tmp_path, monkeypatch):
    start(vm, "b1", start_request())
    os.unlink(os.path.join(vm_dir(tmp_path, fake), DISKS))
    qemu_gone(fake, monkeypatch)
    with pytest.raises(QmpUnreachable, match="Nothing listens"):
        start(vm, "b2", start_request())
    with pytest.raises(QmpUnreachable, match="Nothing listens"):
        stop(vm, "other")
    stopped = stop(vm, "b1")
    assert stopped["changed"] is True and stopped["removed"]["state_file"] is True
    assert stopped["warnings"][0] == GONE
    assert state_files(tmp_path) == []


def offline_record(tmp_path, fake, backup_id):
    """An offline backup's record whose qemu-nbd is alive (this very process stands in for it)."""
    state = VmState(str(tmp_path / "state"), os.path.basename(vm_dir(tmp_path, fake)), "the test VM")
    state.dir.write_json(BACKUP, dict(
        kind="offline", backup_id=backup_id, tag="0000abcd", request=start_request(), complete=True,
        checkpoint=None, disks=[dict(disk="vda", export="%s/0000abcd/vda" % backup_id, filename="/img/vda")],
        added=[], servers=[dict(disk="vda", socket=None, owner=this_process())], fingerprints={},
        nbd_socket=None, socket_identity=None, result=dict(id=backup_id, offline=True), started=1))


def test_an_offline_backup_of_a_vm_that_started_since_is_not_the_same_backup_again(fake, vm, tmp_path):
    start(vm, "b0", start_request())
    stop(vm, "b0")
    offline_record(tmp_path, fake, "b1")
    with pytest.raises(UserError, match="Backup 'b1' of the VM on QMP socket .* is only partly there"):
        start(vm, "b1", start_request())


def test_a_record_of_a_kind_no_connection_here_ends_is_refused_by_name(fake, vm, tmp_path):
    start(vm, "b0", start_request())
    stop(vm, "b0")
    offline_record(tmp_path, fake, "b1")
    record = VmState(str(tmp_path / "state"), os.path.basename(vm_dir(tmp_path, fake)), "the test VM")
    record.save_backup(dict(record.backup(), kind="libvirt-pull"))
    with pytest.raises(UserError, match="Backup b1 of the VM on QMP socket .* is a libvirt-pull backup"):
        stop(vm, "b1")
