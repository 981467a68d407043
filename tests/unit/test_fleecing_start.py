"""A backup start over QMP, against a fake QEMU: what it makes, when it holds the guest still, and how it rolls back."""

import json
import os
import stat

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpError

from fake_agent import FakeAgent
from fake_qmp import DISK_SIZE, FakeQmp, qdev_path
from fleecing_support import (
    CLIENT,
    DISKS,
    IMAGES,
    changes,
    make_vm,
    registry,
    start,
    start_request,
    state_files,
    stop,
    tls_request,
    vm_dir,
)


def scratch_file(fake, scratch):
    """(the raw node that caps a scratch image at its room, the file node of the image's descriptor)."""
    raw = fake.nodes[scratch.children["file"]]
    return raw, fake.nodes[raw.children["file"]]


def fdset_record(fake, fdset_id):
    """What a start wrote into an fdset's opaque string."""
    (entry,) = fake.fdsets[fdset_id]
    mark, _space, record = entry["opaque"].partition(" ")
    assert mark == "fleetbackup"
    return json.loads(record)


def test_a_full_start_puts_each_disk_behind_a_copy_before_write_filter_and_exports_it_twice(fake, vm, tmp_path):
    result = start(vm, "b1", start_request())
    backup = result["backup"]
    assert result["changed"] is True and [disk["disk"] for disk in backup["disks"]] == list(DISKS)
    socket_path = backup["nbd_socket"]
    exports = {export["name"]: export for export in fake.exports.values()}
    for index, (name, disk) in enumerate(zip(DISKS, backup["disks"])):
        image = fake.images[name]
        cbw = fake.attached(name)
        assert cbw.driver == "copy-before-write" and cbw.children["file"] == image
        assert cbw.options["on-cbw-error"] == "break-snapshot" and cbw.options["cbw-timeout"] == 10
        scratch = fake.nodes[cbw.children["target"]]
        assert scratch.driver == "qcow2" and scratch.children["backing"] == image
        raw, scratch_image = scratch_file(fake, scratch)
        held = os.fstat(scratch_image.fd)
        # A nameless image file, its room reserved, and capped there by the raw node.
        assert stat.S_ISREG(held.st_mode) and held.st_nlink == 0 and held.st_size == raw.options["size"] >= 1 << 20
        bound = os.stat(socket_path)
        assert fdset_record(fake, scratch_image.fdset) == dict(
            backup="b1", index=index, qdev=qdev_path(name), root=image, socket=socket_path,
            socket_identity=[bound.st_dev, bound.st_ino])
        (probe,) = [node for node in fake.nodes.values()
                    if node.driver == "snapshot-access" and node.children["file"] == cbw.name]
        data = exports[disk["export"]]
        assert data["node-name"] == scratch.name and data["writable"] is False and "bitmaps" not in data
        assert exports[disk["export"] + "/intact"]["node-name"] == probe.name
        assert disk["url"] == "nbd+unix:///%s?socket=%s" % (disk["export"], socket_path)
        assert (disk["mode"], disk["dirty_bitmap"], disk["checkpoint"]) == ("full", None, False)
    assert len(exports) == 2 * len(DISKS)
    assert fake.nbd_server["address"] == socket_path and fake.nbd_server["tls-creds"] is None
    assert fake.named_fds == {} and fake.status == "running"
    assert backup["consistency"] == "crash" and backup["pause"] >= 0
    assert state_files(tmp_path) == ["backup.json", "nbd.sock"]
    assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600


def test_the_vcpus_are_paused_exactly_around_the_bitmap_transaction_and_the_drive_switches(fake, vm):
    start(vm, "b1", start_request(checkpoint="c1"))
    assert changes(fake.ran_while_paused()) == ["transaction", *["qom-set"] * len(DISKS), "cont"]
    assert changes(fake.commands).count("stop") == 1 and fake.status == "running"
    (transaction,) = [arguments for command, arguments in fake.ran_while_paused() if command == "transaction"]
    assert transaction["actions"] == [
        {"type": "block-dirty-bitmap-add", "data": {"node": fake.images[name], "name": "c1", "persistent": True}}
        for name in DISKS]
    switched = [arguments for command, arguments in fake.commands if command == "qom-set"]
    assert switched == [{"path": qdev_path(name), "property": "drive", "value": fake.attached(name).name}
                        for name in DISKS]


def test_a_new_checkpoint_is_recorded_with_the_size_of_each_disk(fake, vm, tmp_path):
    backup = start(vm, "b1", start_request(checkpoint="c1"))["backup"]
    assert [disk["checkpoint"] for disk in backup["disks"]] == [True] * len(DISKS)
    for name, image in zip(DISKS, IMAGES):
        assert fake.nodes[fake.images[name]].bitmaps["c1"]["persistent"] is True
        assert registry(tmp_path).get(image, "c1")["size"] == DISK_SIZE


def test_an_incremental_start_exports_a_frozen_copy_of_the_checkpoint(fake, vm):
    dirty = {"vda": 3 << 16, "vdb": 0, "vdc": 1 << 20}
    for name in DISKS:
        fake.add_checkpoint(name, "c1", dirty=dirty[name], granularity=131072)
    backup = start(vm, "b2", start_request(incremental="c1", checkpoint="c2"))["backup"]
    exports = {export["name"]: export for export in fake.exports.values()}
    for name, disk in zip(DISKS, backup["disks"]):
        bitmaps = fake.nodes[fake.images[name]].bitmaps
        frozen = bitmaps["fb-b2"]
        assert (frozen["recording"], frozen["persistent"], frozen["granularity"]) == (False, False, 131072)
        assert frozen["count"] == dirty[name] and frozen["busy"] is True  # held by its export
        assert bitmaps["c1"]["recording"] is True and bitmaps["c2"]["count"] == 0 and bitmaps["c2"]["persistent"]
        assert exports[disk["export"]]["bitmaps"] == [{"node": fake.images[name], "name": "fb-b2"}]
        assert (disk["mode"], disk["dirty_bytes"], disk["dirty_bitmap"]) == (
            "incremental", dirty[name], "qemu:dirty-bitmap:fb-b2")
    (transaction,) = [arguments for command, arguments in fake.ran_while_paused() if command == "transaction"]
    assert [(action["type"], action["data"]["node"]) for action in transaction["actions"]] == [
        (kind, fake.images[name]) for name in DISKS
        for kind in ("block-dirty-bitmap-add", "block-dirty-bitmap-merge", "block-dirty-bitmap-add")]


# (command, which of its calls fails, the step the message names) in a full start of three disks with a checkpoint.
STEPS = [
    ("add-fd", 1, "handing the scratch image of disk vda to QEMU"),
    ("add-fd", 3, "handing the scratch image of disk vdc to QEMU"),
    ("blockdev-add", 1, "adding the scratch node of disk vda"),
    ("blockdev-add", 2, "adding the copy-before-write filter of disk vda"),
    ("blockdev-add", 4, "adding the copy-before-write filter of disk vdb"),
    ("stop", 1, "QMP command 'stop'"),
    ("transaction", 1, "the bitmap transaction"),
    ("qom-set", 1, "switching disk vda to its copy-before-write filter"),
    ("qom-set", 3, "switching disk vdc to its copy-before-write filter"),
    ("blockdev-add", 7, "adding the probe node of disk vda"),
    ("blockdev-add", 9, "adding the probe node of disk vdc"),
    ("getfd", 1, "starting the NBD server"),
    ("nbd-server-start", 1, "starting the NBD server"),
    ("block-export-add", 1, "exporting disk vda over NBD"),
    ("block-export-add", 2, "exporting the probe of disk vda over NBD"),
    ("block-export-add", 6, "exporting the probe of disk vdc over NBD"),
]


# ... and in one over TCP with TLS, where the scratch images have the first three fdsets.
TLS_STEPS = [
    ("add-fd", 4, "adding the TLS credentials and the client filter"),
    ("object-add", 1, "adding the TLS credentials and the client filter"),
    ("remove-fd", 1, "adding the TLS credentials and the client filter"),
    ("object-add", 2, "adding the TLS credentials and the client filter"),
    ("nbd-server-start", 1, "starting the NBD server"),
    ("block-export-add", 3, "exporting disk vdb over NBD"),
]


def assert_start_fails_at_step_leaving_qemu_as_it_was(fake, vm, tmp_path, request, command, nth, step):
    before = fake.state()
    fake.fail(command, nth)
    with pytest.raises(UserError) as failure:
        start(vm, "b1", request)
    message = str(failure.value)
    failed = "Starting backup 'b1' of the VM on QMP socket %s failed: %s failed" % (fake.socket_path, step)
    assert message.startswith(failed) and "injected failure" in message
    assert message.endswith("Everything it had created was removed.")
    # Running, and no node, export, fdset, object, bitmap or descriptor more; no socket, copy or state file either.
    assert fake.state() == before
    assert state_files(tmp_path) == []


@pytest.mark.parametrize("command,nth,step", STEPS)
def test_a_start_that_fails_at_any_step_leaves_qemu_as_it_was(fake, vm, tmp_path, command, nth, step):
    assert_start_fails_at_step_leaving_qemu_as_it_was(fake, vm, tmp_path, start_request(checkpoint="c1"), command,
                                                      nth, step)
    assert [registry(tmp_path).get(image, "c1") for image in IMAGES] == [None] * len(IMAGES)


@pytest.mark.parametrize("command,nth,step", TLS_STEPS)
def test_a_start_over_tls_that_fails_at_any_step_leaves_qemu_as_it_was(fake, vm, tmp_path, command, nth, step):
    request, _contents = tls_request(tmp_path)
    assert_start_fails_at_step_leaving_qemu_as_it_was(fake, vm, tmp_path, request, command, nth, step)


def test_a_late_answer_to_stop_still_resumes_the_vm(fake, vm, tmp_path):
    before = fake.state()
    fake.fail("stop", error=QmpError("QMP command 'stop' got no answer within 10s."), applied=True)
    with pytest.raises(UserError, match="'stop' got no answer.*Everything it had created was removed"):
        start(vm, "b1", start_request())
    assert fake.state() == before and state_files(tmp_path) == []


def test_a_cont_that_fails_twice_leaves_the_vm_paused_and_says_so_first(fake, vm, tmp_path):
    before = fake.state()
    fake.fail("cont", times=2)
    with pytest.raises(UserError) as failure:
        start(vm, "b1", start_request())
    assert "THE VM IS LEFT PAUSED" in str(failure.value) and str(failure.value).endswith("the VM is still paused.")
    # The pause record stays, by which the next start, stop or info resumes the VM once this run is over.
    assert fake.status == "paused" and state_files(tmp_path) == ["paused.json"]
    assert fake.nodes.keys() == before["nodes"].keys() and fake.exports == {}
    fake.execute("cont")  # QEMU closes the removed fdsets once the VM runs
    assert fake.state() == before


def test_a_drive_switch_that_qemu_reports_as_failed_yet_made_is_taken(fake, vm):
    fake.fail("qom-set", applied=True)
    start(vm, "b1", start_request())
    assert [fake.attached(name).driver for name in DISKS] == ["copy-before-write"] * len(DISKS)


def test_a_rollback_that_fails_says_so_and_a_stop_removes_the_rest(fake, vm, tmp_path):
    before = fake.state()
    fake.fail("transaction")
    fake.fail("blockdev-del")
    with pytest.raises(UserError) as failure:
        start(vm, "b1", start_request(checkpoint="c1"))
    assert str(failure.value).startswith("Starting backup 'b1' of the VM on QMP socket %s failed: the bitmap "
                                         "transaction failed: " % fake.socket_path)
    assert "Cleaning up failed too: QMP command 'blockdev-del' failed" in str(failure.value)
    assert stop(vm, "b1")["changed"] is True
    assert fake.state() == before and state_files(tmp_path) == []


def test_a_second_start_with_another_id_is_refused_naming_the_running_one(fake, vm, tmp_path):
    start(vm, "b1", start_request())
    running = fake.state()
    for state_lost in (False, True):
        if state_lost:
            os.remove(os.path.join(vm_dir(tmp_path, fake), "backup.json"))  # QEMU still tells which backup runs
        with pytest.raises(UserError, match=r"Backup b1 of the VM on QMP socket .* is running: one backup per VM "
                                            r"runs at a time. End it with fleetbackup.qemu.qemu_backup_stop "
                                            r"\(backup_id: b1,"):
            start(vm, "b2", start_request())
        assert fake.state() == running


def test_the_same_start_again_returns_its_backup_and_other_options_are_refused(fake, vm):
    first = start(vm, "b1", start_request())
    running = fake.state()
    again = start(vm, "b1", start_request())
    assert again["changed"] is False and again["backup"] == first["backup"] and fake.state() == running
    with pytest.raises(UserError, match="already runs with other options \\(scratch_size, cbw_timeout differ\\)"):
        start(vm, "b1", start_request(scratch_size="1G", cbw_timeout=5))


def test_a_start_in_check_mode_asks_qemu_and_changes_nothing(fake, tmp_path, monkeypatch):
    before = fake.state()
    result = start(make_vm(tmp_path, fake, monkeypatch, check_mode=True), "b1", start_request(checkpoint="c1"),
                   check_mode=True)
    assert result["changed"] is True and [disk["disk"] for disk in result["backup"]["disks"]] == list(DISKS)
    assert changes(fake.commands) == [] and fake.state() == before
    assert not os.path.exists(tmp_path / "state")


def test_a_start_on_a_paused_vm_leaves_its_run_state_alone(fake, vm):
    fake.status = "paused"
    backup = start(vm, "b1", start_request(checkpoint="c1"))["backup"]
    assert "stop" not in changes(fake.commands) and "cont" not in changes(fake.commands)
    assert fake.status == "paused" and backup["pause"] is None


def test_a_start_over_tcp_serves_tls_with_the_credentials_read_once_and_only_the_allowed_clients(fake, vm, tmp_path):
    request, contents = tls_request(tmp_path)
    backup = start(vm, "b1", request)["backup"]
    port = backup["nbd_tcp"]["port"]
    assert port and backup["nbd_tcp"] == dict(host="127.0.0.1", port=port, tls=True) and backup["nbd_socket"] is None
    server = fake.nbd_server
    assert server["address"] == ("127.0.0.1", port)
    creds, authz = fake.objects[server["tls-creds"]], fake.objects[server["tls-authz"]]
    assert (creds["qom-type"], creds["endpoint"], creds["verify-peer"]) == ("tls-creds-x509", "server", True)
    assert creds["loaded"] == contents  # as read and checked, through the descriptor of a directory of ours
    assert (authz["qom-type"], authz["policy"]) == ("authz-list", "deny")
    assert authz["rules"] == [{"match": CLIENT, "policy": "allow", "format": "exact"}]
    # The directory's fdset and the copies are gone as soon as QEMU read them.
    assert sorted(fdset_record(fake, fdset_id)["index"] for fdset_id in fake.fdsets) == list(range(len(DISKS)))
    assert state_files(tmp_path) == ["backup.json"]
    assert [disk["url"] for disk in backup["disks"]] == ["nbds://127.0.0.1:%d/%s" % (port, disk["export"])
                                                         for disk in backup["disks"]]


def note_each_call(agent, commands, fake, noted):
    """Note, at each of these agent commands, the QMP commands that QEMU got before it."""
    for command in commands:
        def noting(arguments, command=command, answer=agent.handlers[command]):
            noted.append((command, len(fake.commands)))
            return answer(arguments)
        agent.handlers[command] = noting


def test_a_frozen_guest_is_thawed_right_after_the_pause(fake, vm, tmp_path):
    agent_socket = str(tmp_path / "qga.sock")
    agent = FakeAgent(agent_socket)
    fake.chardevs.append({"label": "qga0", "filename": "unix:%s,server=on" % agent_socket})
    noted = []
    note_each_call(agent, ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw"), fake, noted)
    try:
        backup = start(vm, "b1", start_request(freeze="always", guest_agent_socket=agent_socket))["backup"]
    finally:
        agent.stop()
    (freeze, frozen_at), (thaw, thawed_at) = noted
    assert (freeze, thaw) == ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw")
    assert changes(fake.commands[frozen_at:thawed_at]) == ["stop", *["qom-set"] * len(DISKS), "cont"]
    assert backup["consistency"] == "application" and backup["freeze"]["filesystems"] == 1


def test_a_qemu_that_cannot_break_the_snapshot_instead_of_the_guest_is_refused_before_anything_is_made(
        tmp_path, monkeypatch):
    old = FakeQmp.with_disks(*DISKS, version=(7, 0, 0))
    before = old.state()
    with pytest.raises(UserError, match="QEMU 7.0.0 cannot fleece without risk to the guest.*Upgrade QEMU to 7.1"):
        start(make_vm(tmp_path, old, monkeypatch), "b1", start_request())
    assert changes(old.commands) == [] and old.state() == before and state_files(tmp_path) == []
