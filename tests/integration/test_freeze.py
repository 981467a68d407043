"""Application-consistent backups of a real guest: its agent freezes the file systems around the point in time.

The guest disk boots through the firmware under TCG with qemu-ga and fbg-workload (guest/build-disk.sh).
"""

import json
import os
import signal
import socket

import pytest

from support.flows import Backups
from support.guest import BootedGuestVm, clean_filesystem, workload_files
from support.modules import run_module
from support.held import INTERRUPTED, hold_in_a_child
from support.qemu_vm import DiskSpec, Vm

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import GuestFreeze, SocketAgent
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.identity import qmp_vm_key
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.reach import open_qmp_vm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState


def workload(vm, *args):
    """fbg-workload's answer, as words, through a session of the test's own (closed again: one client at a time)."""
    with vm.agent() as agent:
        result = agent.run("fbg-workload", args, timeout=90)
    assert result.exitcode == 0, result
    return result.stdout.decode().split()


def freeze_status(vm):
    with vm.agent() as agent:
        return agent.fsfreeze_status()


def booted_guest(vms, name="guest"):
    vm = vms([], name=name, kind=BootedGuestVm)
    freeze_status(vm)  # waits for the boot: the agent answers
    return vm


def test_a_frozen_backup_of_the_running_guest_restores_clean(vms, tmp_path, scratch):
    vm = booted_guest(vms)
    assert workload(vm, "start", "64") == ["started"]
    workload(vm, "wait", "5")
    flow = Backups(vm, str(tmp_path))
    agent = dict(guest_agent_socket=vm.agent_socket)

    frozen = flow.start("app", freeze="always", **agent)
    backup = frozen["backup"]
    assert backup["consistency"] == "application" and backup["freeze"]["filesystems"] == 1
    assert backup["freeze"]["reason"] is None and 0 < backup["pause"] < backup["freeze"]["seconds"] < 2
    assert freeze_status(vm) == "thawed"
    flow.copy_all(backup, str(tmp_path), "app")
    assert flow.stop("app")["intact"] is True

    # The same guest without the freeze: a crash-consistent image, whose journal must be replayed.
    crash = flow.start("crash", freeze="never", **agent)["backup"]
    assert crash["consistency"] == "crash" and crash["freeze"] == dict(seconds=None, filesystems=None,
                                                                       reason="freeze is never")
    flow.copy_all(crash, str(tmp_path), "crash")
    flow.stop("crash")
    logged_after = int(workload(vm, "status")[1])
    workload(vm, "wait", str(logged_after + 2))  # the workload went on writing after the freeze
    flow.assert_nothing_left()

    image = str(tmp_path / "app.vda.qcow2")
    assert clean_filesystem(image, scratch) == (False, 0)
    assert clean_filesystem(str(tmp_path / "crash.vda.qcow2"), scratch)[0] is True  # the test can tell them apart
    logged, changed = workload_files(image, scratch)
    assert logged >= 5 and changed == []


def test_auto_freezes_when_the_agent_answers_and_says_why_not_otherwise(vms, tmp_path):
    vm = booted_guest(vms)
    flow = Backups(vm, str(tmp_path))
    planned = run_check_mode(vm, flow, freeze="auto", guest_agent_socket=vm.agent_socket)
    assert planned["consistency"] == "application" and planned["freeze"]["seconds"] is None
    backup = flow.start("b1", guest_agent_socket=vm.agent_socket)["backup"]  # auto is the default
    assert backup["consistency"] == "application" and backup["freeze"]["seconds"] > 0
    flow.stop("b1")
    backup = flow.start("b2")["backup"]
    assert backup["consistency"] == "crash" and "no guest_agent_socket was given" in backup["freeze"]["reason"]
    flow.stop("b2")
    # Another socket (as another VM's agent would be) is refused: its guest would be frozen for this backup.
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(tmp_path / "other-qga.sock"))
    foreign = flow.start("b9", guest_agent_socket=str(tmp_path / "other-qga.sock"), freeze="always")
    other.close()
    assert foreign.failed and "is no socket of this QEMU's character devices" in foreign["msg"], foreign
    assert flow.vm_state_files() == []
    vm.qmp("stop")  # a paused guest's agent cannot answer, and its file systems cannot change
    backup = flow.start("b3", guest_agent_socket=vm.agent_socket)["backup"]
    assert backup["consistency"] == "crash" and "the VM is paused" in backup["freeze"]["reason"]
    flow.stop("b3")
    vm.qmp("cont")
    flow.info()  # a monitor client leaves: QEMU closes the fdsets that it kept while the VM was paused
    flow.assert_nothing_left()


def run_check_mode(vm, flow, **args):
    result = run_module("qemu_backup_start", check_mode=True, **dict(
        vm.connection_args(), state_dir=flow.state_dir, backup_id="planned", scratch_dir=flow.scratch, **args))
    assert not result.failed and flow.vm_state_files() == [], result
    return result["backup"]


class AgentlessVm(Vm):
    """A VM without a guest: its agent channel is there, but nothing in it ever answers."""

    def __init__(self, workdir, disks):
        super().__init__(workdir, disks)
        self.agent_socket = os.path.join(workdir, "qga.sock")

    def machine_args(self):
        return super().machine_args() + [
            "-chardev", "socket,id=qga0,path=%s,server=on,wait=off" % self.agent_socket,
            "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]


def test_always_without_an_agent_fails_clearly_and_leaves_nothing(vms, tmp_path):
    vm = vms([DiskSpec("vda")], kind=AgentlessVm)
    flow = Backups(vm, str(tmp_path))
    cases = [(dict(), "no guest_agent_socket was given"),
             (dict(guest_agent_socket=str(tmp_path / "none.sock")), "does not exist"),
             (dict(guest_agent_socket=vm.agent_socket, freeze_timeout=1), "did not answer within 1.0 s")]
    for args, reason in cases:
        failed = flow.start("b1", freeze="always", **args)
        assert failed.failed and "freeze is always, but the guest's file systems cannot be frozen" in failed["msg"]
        assert reason in failed["msg"] and "freeze: auto" in failed["msg"], failed["msg"]
        flow.assert_nothing_left()
        assert vm.status() == "running" and vm.named_bitmaps("vda") == {}
    # Bad input is refused, with auto too.
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    for args, words in [(dict(freeze_timeout=0), "freeze_timeout must be"),
                        (dict(guest_agent_socket=str(open_dir / "qga.sock")), "can be written by other users"),
                        (dict(domain="web1", guest_agent_socket=vm.agent_socket), "mutually exclusive")]:
        failed = flow.start("b1", **args)
        assert failed.failed and words in failed["msg"], failed["msg"]
    assert flow.vm_state_files() == []
    auto = flow.start("b1", guest_agent_socket=vm.agent_socket, freeze_timeout=1)["backup"]
    assert auto["consistency"] == "crash" and "did not answer within 1.0 s" in auto["freeze"]["reason"]
    flow.stop("b1")
    flow.assert_nothing_left()


def start_in_process(vm, flow, backup_id, fail):
    """Start a backup with the freeze through the module_utils in this process; fail(command, call) runs each QMP
    command."""
    registry = CheckpointRegistry(os.path.join(flow.state_dir, "checkpoints"))
    request = dict(disks=None, checkpoint="c1", incremental=None, fallback_to_full=False, nbd_socket=None,
                   cbw_timeout=10, scratch_size="10%", scratch_dir=flow.scratch, freeze="always",
                   guest_agent_socket=vm.agent_socket, freeze_timeout=10, libvirt_small_scratch=False)
    with open_qmp_vm(vm.qmp_socket, 10, flow.state_dir, registry) as connection:
        real_execute = connection.qmp.execute
        connection.qmp.execute = lambda command, arguments=None, timeout=None: fail(
            command, lambda: real_execute(command, arguments, timeout))
        return VmBackups(connection).start(backup_id, request, False)


def test_the_guest_is_thawed_even_when_the_transaction_fails(vms, tmp_path):
    vm = booted_guest(vms)
    flow = Backups(vm, str(tmp_path))
    record = os.path.join(flow.state_dir, "vms", qmp_vm_key(vm.qmp_socket), "frozen.json")
    seen = []

    def fail(name, call):
        if name in ("transaction", "qom-set"):
            seen.append((name, os.path.exists(record), vm.status()))  # frozen (recorded) and paused by now
            raise QmpCommandError(name, "GenericError", "injected")
        return call()

    with pytest.raises(UserError) as failure:
        start_in_process(vm, flow, "f1", fail)
    assert "the bitmap transaction failed" in str(failure.value) and "injected" in str(failure.value)
    assert seen == [("transaction", True, "paused")]
    assert freeze_status(vm) == "thawed" and vm.status() == "running"
    flow.info()  # a monitor client leaves: QEMU closes the removed fdsets of a running VM
    flow.assert_nothing_left()


def freeze_in_a_child(vm, state_dir, signum):
    """Fork a run of ours that freezes the guest and sends itself signum while it is frozen; its wait status."""
    def freeze():
        frozen = GuestFreeze(VmState(state_dir, qmp_vm_key(vm.qmp_socket), "test VM"), "dying", "always",
                             lambda: SocketAgent(vm.agent_socket, 10))
        frozen.check()
        return frozen

    return hold_in_a_child(freeze, signum)


def test_a_run_killed_while_the_guest_is_frozen_never_leaves_it_frozen(vms, tmp_path):
    vm = booted_guest(vms)
    flow = Backups(vm, str(tmp_path))
    record = os.path.join(flow.state_dir, "vms", qmp_vm_key(vm.qmp_socket), "frozen.json")

    # SIGTERM and SIGINT wait for the thaw, then become an error that rolls the start back.
    for signum in (signal.SIGTERM, signal.SIGINT):
        status = freeze_in_a_child(vm, flow.state_dir, signum)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == INTERRUPTED
        assert freeze_status(vm) == "thawed" and not os.path.exists(record)

    # SIGKILL cannot wait: the record says the freeze was ours, and the next info thaws the guest.
    status = freeze_in_a_child(vm, flow.state_dir, signal.SIGKILL)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert freeze_status(vm) == "frozen" and os.path.exists(record)
    info = flow.info()
    assert info["changed"] is True and "died while the guest's file systems were frozen; they were thawed" in \
        json.dumps(info["warnings"])
    assert freeze_status(vm) == "thawed" and not os.path.exists(record)

    # Only such a guest: one that its owner froze stays frozen through info, start and stop.
    with vm.agent() as agent:
        agent.fsfreeze_freeze()
    assert flow.info()["changed"] is False
    flow.start("b1", freeze="never")
    flow.stop("b1")
    assert freeze_status(vm) == "frozen"
    with vm.agent() as agent:
        agent.fsfreeze_thaw()

    # A start and a stop thaw it too.
    for module in ("start", "stop"):
        freeze_in_a_child(vm, flow.state_dir, signal.SIGKILL)
        result = flow.start("b2", freeze="never") if module == "start" else flow.stop("b2")
        assert "they were thawed" in json.dumps(result["warnings"]), module
        assert freeze_status(vm) == "thawed"
    flow.assert_nothing_left()
