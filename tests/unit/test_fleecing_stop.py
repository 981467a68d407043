"""A backup stop over QMP, against a fake QEMU: it removes what its start made, and only that, however it finds it."""

import os
from collections import Counter

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError

from fake_qmp import qdev_path
from fleecing_support import (
    DISKS,
    IMAGES,
    changes,
    leave_paused_by_a_dead_run,
    make_vm,
    registry,
    start,
    start_request,
    state_files,
    stop,
    tls_request,
    vm_dir,
)

NOTHING_REMOVED = dict(job=False, exports=[], nodes=[], devices=[], bitmaps=0, scratch_images=0, nbd_server=False,
                       objects=[], files=[], checkpoint=None, state_file=False)


def made_by_someone_else(fake, tmp_path):
    """A checkpoint, a bitmap that shares our temporary bitmap's name, a node, an object and an fdset of others."""
    fake.add_checkpoint("vda", "nightly", dirty=1 << 16)
    fake.add_checkpoint("vdb", "fb-b1")  # a checkpoint, though named as an incremental's frozen copy would be
    fake.execute("blockdev-add", {"driver": "file", "node-name": "other-file", "filename": "/img/other.qcow2"})
    fake.execute("blockdev-add", {"driver": "qcow2", "node-name": "other", "file": "other-file"})
    fake.execute("object-add", {"qom-type": "secret", "id": "sec0", "data": "letmein"})
    with open(tmp_path / "other", "w") as stream:
        fake.execute_with_fd(stream.fileno(), "add-fd", {"opaque": "libvirt disk 3"})
    fake.commands.clear()


def test_a_stop_removes_everything_a_start_made_and_nothing_else(fake, vm, tmp_path):
    made_by_someone_else(fake, tmp_path)
    before = fake.state()
    backup = start(vm, "b1", start_request())["backup"]
    result = stop(vm, "b1")
    assert fake.state() == before and state_files(tmp_path) == []
    assert result["changed"] is True and result["intact"] is True and result["warnings"] == []
    removed = result["removed"]
    assert len(removed["exports"]) == 2 * len(DISKS) and len(removed["nodes"]) == 3 * len(DISKS)
    assert removed["devices"] == [qdev_path(name) for name in DISKS] and removed["scratch_images"] == len(DISKS)
    assert removed["files"] == [backup["nbd_socket"]] and removed["nbd_server"] is True
    assert (removed["bitmaps"], removed["objects"], removed["checkpoint"], removed["state_file"]) == (0, [], None, True)


def test_the_probes_are_read_on_the_backups_own_socket_before_anything_goes(fake, vm):
    backup = start(vm, "b1", start_request())["backup"]
    assert stop(vm, "b1")["intact"] is True  # the fake reads a probe only while it is exported, on its filter
    assert fake.probe_reads == ["nbd+unix:///%s/intact?socket=%s" % (disk["export"], backup["nbd_socket"])
                                for disk in backup["disks"]]


def test_a_stop_finds_a_broken_view_and_still_removes_everything(fake, vm, tmp_path):
    before = fake.state()
    start(vm, "b1", start_request())
    fake.break_snapshot("vdb")
    result = stop(vm, "b1")
    assert result["intact"] is False and result["changed"] is True
    assert fake.state() == before and state_files(tmp_path) == []


def test_a_stop_after_the_state_file_is_gone_still_finds_everything_by_the_fdsets(fake, vm, tmp_path):
    before = fake.state()
    backup = start(vm, "b1", start_request())["backup"]
    os.remove(os.path.join(vm_dir(tmp_path, fake), "backup.json"))
    result = stop(vm, "b1")
    assert fake.state() == before and state_files(tmp_path) == []  # the socket too: its fdsets name it
    assert result["removed"]["files"] == [backup["nbd_socket"]] and result["removed"]["state_file"] is False
    assert result["intact"] is None  # what a completed start recorded is gone


@pytest.mark.parametrize("discard_checkpoint", [False, True])
def test_a_stop_discards_the_new_checkpoint_only_when_asked(fake, vm, tmp_path, discard_checkpoint):
    for name in DISKS:
        fake.add_checkpoint(name, "c1", dirty=1 << 16)
    start(vm, "b2", start_request(incremental="c1", checkpoint="c2"))
    removed = stop(vm, "b2", discard_checkpoint=discard_checkpoint)["removed"]
    assert removed["bitmaps"] == len(DISKS) and removed["checkpoint"] == ("c2" if discard_checkpoint else None)
    for name, image in zip(DISKS, IMAGES):
        bitmaps = fake.nodes[fake.images[name]].bitmaps
        assert "fb-b2" not in bitmaps and "c1" in bitmaps and ("c2" in bitmaps) is not discard_checkpoint
        assert (registry(tmp_path).get(image, "c2") is None) is discard_checkpoint


def test_a_stop_of_a_vm_left_paused_by_a_dead_run_resumes_it_first(fake, vm, tmp_path):
    before = fake.state()
    start(vm, "b1", start_request())
    leave_paused_by_a_dead_run(tmp_path, fake, "b1")
    fake.commands.clear()
    result = stop(vm, "b1")
    (warning,) = result["warnings"]
    assert warning.startswith("A fleetbackup run (pid %d, backup b1) died while it had the vCPUs paused; the VM was "
                              "resumed." % os.getpid())
    assert changes(fake.commands)[0] == "cont" and result["changed"] is True
    assert fake.state() == before and state_files(tmp_path) == []


def test_a_stop_of_a_paused_vm_says_that_the_scratch_space_comes_back_once_it_runs(fake, vm):
    fake.status = "paused"
    before = fake.state()
    start(vm, "b1", start_request())
    (warning,) = stop(vm, "b1")["warnings"]
    assert "The VM is not running: QEMU lets go of the backup's scratch images" in warning
    assert fake.status == "paused" and len(fake.fdsets) == len(DISKS)  # removed, yet held while the VM is paused
    fake.execute("cont")
    assert fake.state() == dict(before, status="running")


# (command, which of its calls fails) in a stop of three disks.
STOP_STEPS = [("block-export-del", 1), ("nbd-server-stop", 1), ("blockdev-del", 1), ("qom-set", 2),
              ("blockdev-del", 5), ("remove-fd", 2)]


@pytest.mark.parametrize("command,nth", STOP_STEPS)
def test_a_stop_that_fails_half_way_removes_the_rest_when_run_again(fake, vm, tmp_path, command, nth):
    before = fake.state()
    start(vm, "b1", start_request(checkpoint="c1"))
    fake.fail(command, nth)
    with pytest.raises(FleetbackupError, match="QMP command '%s' failed: GenericError: injected failure" % command):
        stop(vm, "b1")
    assert stop(vm, "b1", discard_checkpoint=True)["changed"] is True
    assert fake.state() == before and state_files(tmp_path) == []


def test_a_stop_of_another_id_leaves_the_running_backup_alone(fake, vm):
    start(vm, "b1", start_request())
    running = fake.state()
    assert stop(vm, "b2") == dict(changed=False, removed=NOTHING_REMOVED, intact=None, warnings=[])
    assert fake.state() == running


def test_a_stop_in_check_mode_says_what_it_would_remove_and_removes_nothing(fake, vm, tmp_path, monkeypatch):
    start(vm, "b1", start_request())
    running, files = fake.state(), state_files(tmp_path)
    fake.commands.clear()
    result = stop(make_vm(tmp_path, fake, monkeypatch, check_mode=True), "b1", check_mode=True)
    assert result["changed"] is True and result["intact"] is True and len(result["removed"]["nodes"]) == 3 * len(DISKS)
    assert changes(fake.commands) == [] and fake.state() == running and state_files(tmp_path) == files


def test_a_stop_over_tls_reads_the_probes_on_a_unix_socket_after_the_tcp_server_ended(fake, vm, tmp_path):
    request, _contents = tls_request(tmp_path)
    before = fake.state()
    start(vm, "b1", request)
    result = stop(vm, "b1")
    # The fake reads a probe only from a plain unix server: QEMU admits only the backup host's certificate over TCP.
    assert result["intact"] is True
    assert {read.partition("?socket=")[2] for read in fake.probe_reads} == {
        os.path.join(vm_dir(tmp_path, fake), "nbd.sock")}
    assert sorted(result["removed"]["objects"]) == ["fb-b1-authz", "fb-b1-tls"]
    assert fake.state() == before and state_files(tmp_path) == []


def test_a_stop_does_each_qmp_query_once(fake, vm):
    start(vm, "b1", start_request(checkpoint="c1"))
    fake.commands.clear()
    stop(vm, "b1", discard_checkpoint=True)
    asked = Counter(command for command, _arguments in fake.commands)
    queries = ("query-block", "query-block-exports", "query-named-block-nodes", "query-fdsets", "qom-list")
    assert {query: asked[query] for query in queries if asked[query] > 1} == {}
