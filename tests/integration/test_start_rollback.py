"""A start that fails at any QMP step removes all it made, and never leaves the VM paused or on a filter."""

import os

import pytest

from support.flows import Backups
from support.qemu_vm import DiskSpec

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views import fleecing as qmp_fleecing
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import GuestFreeze
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError, QmpError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.identity import qmp_vm_key
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.reach import open_qmp_vm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState

# (command, which call of it fails) for two disks, the second on an iothread, with a checkpoint.
STEPS = [("add-fd", 1), ("add-fd", 2), ("blockdev-add", 1), ("blockdev-add", 2), ("blockdev-add", 4),
         ("stop", 1), ("transaction", 1), ("qom-set", 1), ("qom-set", 2), ("blockdev-add", 5),
         ("blockdev-add", 6), ("getfd", 1), ("nbd-server-start", 1), ("block-export-add", 1),
         ("block-export-add", 2), ("block-export-add", 4)]


def start_in_process(vm, flow, fail):
    """Start a backup through the module_utils in this process; fail(command, arguments, real) runs each QMP call."""
    registry = CheckpointRegistry(os.path.join(flow.state_dir, "checkpoints"))
    request = dict(disks=None, checkpoint="c1", incremental=None, fallback_to_full=False, nbd_socket=None,
                   cbw_timeout=10, scratch_size="0", scratch_dir=flow.scratch, freeze="never",
                   guest_agent_socket=None, freeze_timeout=10)
    with open_qmp_vm(vm.qmp_socket, 10, flow.state_dir, registry) as connection:
        qmp = connection.qmp
        real_execute, real_with_fd = qmp.execute, qmp.execute_with_fd
        qmp.execute = lambda command, arguments=None, timeout=None: fail(
            command, lambda: real_execute(command, arguments, timeout))
        qmp.execute_with_fd = lambda fd, command, arguments: fail(
            command, lambda: real_with_fd(fd, command, arguments))
        view = qmp_fleecing.FleecingView(connection)
        plan = view.plan("f1", request)
        with pytest.raises(UserError) as failure:
            view.create(plan, GuestFreeze(connection.state, "f1", "never", None))
    return str(failure.value)


def assert_rolled_back(vm, flow):
    assert vm.status() == "running"
    flow.info()  # a monitor client leaves: QEMU closes the removed fdsets of a running VM
    flow.assert_nothing_left()
    assert all(vm.named_bitmaps(disk) == {} for disk in vm.disks)
    again = flow.start("again")
    assert again["changed"] is True and flow.stop("again")["intact"] is True


@pytest.mark.parametrize("command,nth", STEPS)
def test_a_start_failing_at_any_step_removes_everything(vms, tmp_path, command, nth):
    vm = vms([DiskSpec("vda"), DiskSpec("vdb", iothread=True)])
    flow = Backups(vm, str(tmp_path))
    calls = {}

    def fail(name, call):
        calls[name] = calls.get(name, 0) + 1
        if name == command and calls[name] == nth:
            raise QmpCommandError(name, "GenericError", "injected")
        return call()

    message = start_in_process(vm, flow, fail)
    assert "injected" in message and "Everything it had created was removed" in message
    assert_rolled_back(vm, flow)


def test_a_late_answer_to_stop_still_resumes_the_vm(vms, tmp_path):
    vm = vms([DiskSpec("vda"), DiskSpec("vdb")])
    flow = Backups(vm, str(tmp_path))

    def late(name, call):
        result = call()
        if name == "stop":  # QEMU paused, but the answer came after qmp_timeout (a slow drain)
            raise QmpError("QMP command 'stop' got no answer within 10s.")
        return result

    assert "'stop' got no answer" in start_in_process(vm, flow, late)
    assert_rolled_back(vm, flow)


def test_a_cont_that_fails_twice_says_the_vm_is_left_paused(vms, tmp_path):
    vm = vms([DiskSpec("vda")])
    flow = Backups(vm, str(tmp_path))

    def refuse_cont(name, call):
        if name == "cont":
            raise QmpCommandError(name, "GenericError", "injected")
        return call()

    message = start_in_process(vm, flow, refuse_cont)
    assert "THE VM IS LEFT PAUSED" in message and "the VM is still paused" in message
    # The record stays, so that once this run is over the next start, stop or info resumes the VM.
    assert vm.status() == "paused" and flow.vm_state_files() == ["paused.json"]
    vm.qmp("cont")
    # The run is this test process, which lives on: end it as far as the record goes.
    VmState(flow.state_dir, qmp_vm_key(vm.qmp_socket), "test VM").forget_pause()
    assert_rolled_back(vm, flow)
