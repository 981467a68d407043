"""Trust nothing: private state, stop by id alone, one backup per VM, QEMU as another user, results by identity."""

import json
import os
import socket
import stat

from support.flows import Backups
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB, same

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.identity import qmp_vm_key


def vm_dir(flow):
    return os.path.join(flow.state_dir, "vms", qmp_vm_key(flow.vm.qmp_socket))


def private(tmp_path, name):
    path = tmp_path / name
    path.mkdir(mode=0o700)
    return str(path)


def no_nbd_server(vm):
    """True when QEMU runs no NBD server: stopping one that is not running fails, saying so."""
    reply = vm.monitor.cmd_raw("nbd-server-stop")  # the raw reply: an error is the answer we hope for
    return "error" in reply and "not running" in reply["error"]["desc"]


def test_stop_needs_only_the_vm_and_the_backup_id(vms, tmp_path):
    vm = vms([DiskSpec("vda"), DiskSpec("vdb")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x21))
    flow = Backups(vm, str(tmp_path))
    custom_socket = os.path.join(private(tmp_path, "sockets"), "b1.sock")
    started = flow.start("b1", scratch_dir=private(tmp_path, "custom-scratch"), nbd_socket=custom_socket)
    assert started["backup"]["nbd_socket"] == custom_socket and stat.S_ISSOCK(os.lstat(custom_socket).st_mode)
    stopped = flow.stop("b1")  # no scratch_dir, no nbd_socket
    assert stopped["removed"]["nbd_server"] is True and stopped["removed"]["files"] == [custom_socket]
    assert not os.path.lexists(custom_socket) and no_nbd_server(vm)
    flow.assert_nothing_left()
    assert flow.start("b2")["changed"] is True and flow.stop("b2")["intact"] is True

    # Even with its state gone, QEMU itself says what to remove: the fdsets name the devices and the socket.
    default_socket = flow.start("b3")["backup"]["nbd_socket"]
    os.unlink(os.path.join(vm_dir(flow), "backup.json"))
    stopped = flow.stop("b3")
    assert stopped["removed"]["nbd_server"] is True and stopped["removed"]["files"] == [default_socket]
    assert len(stopped["removed"]["nodes"]) == 6 and stopped["removed"]["state_file"] is False
    assert not os.path.lexists(default_socket) and no_nbd_server(vm)
    flow.assert_nothing_left()

    # A socket outside fleetbackup's directory, known only from what QEMU says, is never deleted on its word.
    flow.start("b4", nbd_socket=custom_socket)
    os.unlink(os.path.join(vm_dir(flow), "backup.json"))
    stopped = flow.stop("b4")
    assert stopped["removed"]["files"] == [] and custom_socket in json.dumps(stopped["warnings"])
    assert no_nbd_server(vm)
    flow.assert_nothing_left()
    assert flow.start("b5")["changed"] is True and flow.stop("b5")["changed"] is True


def test_a_planted_state_file_makes_stop_delete_nothing_outside_its_directory(vms, tmp_path):
    vm = vms([DiskSpec("vda")])
    flow = Backups(vm, str(tmp_path))
    flow.start("b1")
    record_path = os.path.join(vm_dir(flow), "backup.json")
    with open(record_path) as stream:
        record = json.load(stream)
    victims = tmp_path / "victims"
    victims.mkdir()
    victim_file = victims / "precious.txt"
    victim_file.write_text("keep me")
    victim_socket = socket.socket(socket.AF_UNIX)
    victim_socket.bind(str(victims / "other.sock"))  # someone else's socket, at a path the state names
    try:
        for path in (victim_file, victims / "other.sock"):
            hostile = dict(record, nbd_socket=str(path), disks=[dict(d, filename=str(victim_file),
                                                                     scratch_file=str(victim_file))
                                                                for d in record["disks"]])
            with open(record_path, "w") as stream:
                json.dump(hostile, stream)
            stopped = flow.stop("b1")
            assert not stopped.failed and str(path) not in stopped["removed"]["files"]
            assert victim_file.read_text() == "keep me" and os.path.lexists(victims / "other.sock")
            flow.start("b1")
            with open(record_path) as stream:
                record = json.load(stream)

        # A symlink where the state should be is refused, not followed; nothing is removed on its word.
        os.unlink(record_path)
        os.symlink(victim_file, record_path)
        refused = flow.stop("b1")
        assert refused.failed and "not a file that fleetbackup made" in refused["msg"]
        assert victim_file.read_text() == "keep me"
        os.unlink(record_path)
        assert flow.stop("b1")["changed"] is True
    finally:
        victim_socket.close()
    flow.assert_nothing_left()

    # A state directory that others could write into is refused outright.
    os.chmod(flow.state_dir, 0o777)
    refused = flow.start("b2")
    assert refused.failed and "others could have put files there" in refused["msg"]


def qemu_uid(vm):
    with open("/proc/%d/status" % vm.pid) as stream:
        return next(int(line.split()[1]) for line in stream if line.startswith("Uid:"))


def test_qemu_running_as_another_user_gets_its_files_as_descriptors(vms, tmp_path):
    def prepare(vm):
        vm.write("vda", 0, 4 * MiB, 0x31)
        vm.write("vdb", 8 * MiB, MiB, 0x32)

    vm = vms([DiskSpec("vda"), DiskSpec("vdb")], prepare=prepare, runas="nobody")
    assert qemu_uid(vm) == 65534
    flow = Backups(vm, str(tmp_path))
    marks = [{d: vm.mark(d) for d in vm.disks}]
    full = flow.start("b1", checkpoint="c1")["backup"]
    vm.write("vda", 0, MiB, 0x41)  # overwrites what the backup must keep: QEMU, as nobody, keeps it for us
    flow.copy_all(full, str(tmp_path), "b1")
    assert flow.stop("b1")["intact"] is True
    marks.append({d: vm.mark(d) for d in vm.disks})
    inc = flow.start("b2", incremental="c1", checkpoint="c2")["backup"]
    flow.copy_all(inc, str(tmp_path), "b2", previous_prefix="b1")
    flow.stop("b2")
    for point, prefix in enumerate(("b1", "b2")):
        for disk in vm.disks:
            image = str(tmp_path / ("%s.%s.qcow2" % (prefix, disk)))
            assert same(image, vm.expected_image(disk, marks[point][disk], image + ".expected"))
    assert stat.S_IMODE(os.stat(flow.state_dir).st_mode) == 0o700 and os.stat(flow.state_dir).st_uid == 0
    flow.assert_nothing_left()


def test_one_backup_per_vm_and_one_meaning_per_id(vms, tmp_path):
    vm = vms([DiskSpec("vda")])
    flow = Backups(vm, str(tmp_path))
    first = flow.start("nightly", checkpoint="c1")
    other = flow.start("hourly")
    assert other.failed and "Backup nightly of" in other["msg"] and "one backup per VM" in other["msg"]
    assert "qemu_backup_stop (backup_id: nightly" in other["msg"]
    changed = flow.start("nightly", checkpoint="c2")
    assert changed.failed and "already runs with other options (checkpoint differ)" in changed["msg"]
    same_again = flow.start("nightly", checkpoint="c1")
    assert same_again["changed"] is False and same_again["backup"] == first["backup"]
    refused = flow.start("fb-x", checkpoint="fb-nightly")
    assert refused.failed and "must not be empty or start with 'fb-'" in refused["msg"]
    flow.stop("nightly", discard_checkpoint=True)
    flow.assert_nothing_left()


def test_a_dest_is_unchanged_only_when_it_holds_the_same_backup(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x51))
    flow = Backups(vm, str(tmp_path))
    dest = str(tmp_path / "web1.vda.qcow2")
    first = flow.start("nightly")["backup"]["disks"][0]
    assert run_module("qemu_backup_copy", src=first["url"], dest=dest)["changed"] is True
    assert run_module("qemu_backup_copy", src=first["url"], dest=dest)["changed"] is False
    flow.stop("nightly")

    # The next night, the same backup id is another backup: the old image must not pass for it.
    vm.write("vda", 0, MiB, 0x52)
    second = flow.start("nightly")["backup"]["disks"][0]
    stale = run_module("qemu_backup_copy", src=second["url"], dest=dest)
    assert stale.failed and "already holds export %s" % first["export"] in stale["msg"]
    assert "not this export's export %s" % second["export"] in stale["msg"] and "force" in stale["msg"]
    assert run_module("qemu_backup_copy", src=second["url"], dest=dest, force=True)["changed"] is True
    assert same(dest, vm.flushed_image("vda"))
    assert run_module("qemu_backup_copy", src=second["url"], dest=dest)["changed"] is False
    flow.stop("nightly")

    # An image that records no backup at all (written by something else) is not taken for one either.
    unknown = tmp_path / "unknown.qcow2"
    unknown.write_bytes(b"not a backup")
    third = flow.start("b3")["backup"]["disks"][0]
    refused = run_module("qemu_backup_copy", src=third["url"], dest=str(unknown))
    assert refused.failed and "an image with no record of its backup" in refused["msg"]
    assert unknown.read_bytes() == b"not a backup"
    flow.stop("b3")
