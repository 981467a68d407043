"""How the unit tests of QMP fleecing reach the code under test: a QMP VM whose monitor is a FakeQmp, and the calls
that qemu_backup_start and qemu_backup_stop make.

The adapters at the top are the one place that knows how a module reaches the VM and starts and stops a backup.
"""

import os
from unittest import mock

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.fleetbackup.qemu.plugins.modules import qemu_backup_start
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views import fleecing_teardown
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import REQUEST_KEYS, check_request
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp import vm as qmp_vm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.reach import open_qmp_vm
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import PAUSED, VmState, registry_dir

from fake_qmp import image_file
from support.flows import vm_state_files

TIMEOUT = 10
# The disks of the fixture `fake`, and their image files.
DISKS = ("vda", "vdb", "vdc")
IMAGES = [image_file(disk) for disk in DISKS]
# The distinguished name of the backup host's client certificate.
CLIENT = "O=fleet,OU=client,CN=backup1"


def make_vm(tmp_path, fake, monkeypatch, check_mode=False):
    """How a module reaches the VM on fake's QMP socket, with its private state in tmp_path/state: each call opens a
    new connection, as each module run does."""
    monkeypatch.setattr(qmp_vm, "QmpClient", lambda socket_path, timeout: fake)
    # A stop reads each probe export over real NBD (view_intact), which the fake cannot serve: the fake answers instead,
    # from whether the snapshot under that probe broke (FakeQmp.read_probe).
    monkeypatch.setattr(fleecing_teardown, "view_intact", fake.read_probe)
    return lambda ending=None: open_qmp_vm(fake.socket_path, TIMEOUT, state_dir(tmp_path), registry(tmp_path),
                                           read_only=check_mode, ending=ending)


def start(vm, backup_id, request, check_mode=False):
    """What qemu_backup_start returns: {changed, backup, warnings}; a failure raises as the module would fail."""
    check_request(request)
    with vm() as connection:
        changed, backup = VmBackups(connection).start(backup_id, request, check_mode)
    return dict(changed=changed, backup=backup, warnings=connection.notes)


def stop(vm, backup_id, discard_checkpoint=False, check_mode=False):
    """What qemu_backup_stop returns: {changed, removed, intact, warnings}."""
    with vm(ending=backup_id) as connection:
        changed, removed, intact = VmBackups(connection).stop(backup_id, discard_checkpoint, check_mode)
    return dict(changed=changed, removed=removed.result(), intact=intact, warnings=connection.notes)


def state_dir(tmp_path):
    return str(tmp_path / "state")


def vm_dir(tmp_path, fake):
    """The VM's own private state directory."""
    return os.path.join(state_dir(tmp_path), "vms", qmp_vm.qmp_vm_key(fake.socket_path))


def registry(tmp_path):
    return CheckpointRegistry(registry_dir(state_dir(tmp_path)))


def state_files(tmp_path):
    """What the VM's state holds besides its lock and its disks as last seen: a backup, a socket, a pause record."""
    return vm_state_files(state_dir(tmp_path))


class _Captured(Exception):
    pass


def start_argument_spec():
    """qemu_backup_start's own argument spec, as its main() hands it to the module."""
    captured = {}

    def capture(argument_spec, **_options):
        captured.update(argument_spec)
        raise _Captured  # main() stops here, before it reads any input

    with mock.patch.object(qemu_backup_start, "VmModule", capture):
        try:
            qemu_backup_start.main()
        except _Captured:
            pass
    return captured


def start_request(**options):
    """The request that qemu_backup_start makes of these options, every other one at its default."""
    result = ArgumentSpecValidator(start_argument_spec()).validate(dict(backup_id="any", **options))
    assert not result.error_messages, result.error_messages
    return {key: result.validated_parameters[key] for key in REQUEST_KEYS}


def leave_paused_by_a_dead_run(tmp_path, fake, backup_id):
    """The vCPUs paused by a run of ours that was killed in its pause window (its record names a dead process)."""
    fake.execute("stop")
    state = VmState(state_dir(tmp_path), qmp_vm.qmp_vm_key(fake.socket_path), "the test VM")
    state.dir.write_json(PAUSED, dict(backup_id=backup_id, owner=dict(this_process(), started=-1)))


def changes(commands):
    """The commands that change QEMU: not the queries."""
    return [command for command, _arguments in commands if not command.startswith("query-") and command != "qom-list"]


def write_credentials(directory):
    """A TLS directory as fleet_ca makes it: the CA's certificate, the server's certificate and its private key."""
    os.mkdir(directory, 0o700)
    contents = {}
    for name, mode in (("ca-cert.pem", 0o644), ("server-cert.pem", 0o644), ("server-key.pem", 0o600)):
        contents[name] = ("-----BEGIN %s-----\n%s\n" % (name, name[::-1])).encode()
        with open(os.path.join(directory, name), "wb") as stream:
            stream.write(contents[name])
        os.chmod(os.path.join(directory, name), mode)
    return contents


def tls_request(tmp_path, **options):
    """A start over TCP with TLS on the loopback address, with credentials in tmp_path/tls; their contents."""
    contents = write_credentials(str(tmp_path / "tls"))
    return start_request(nbd_tcp=dict(host="127.0.0.1", tls_dir=str(tmp_path / "tls"), tls_allow=[CLIENT]),
                         **options), contents
