"""Our private directories and files: modes, refusals, atomic replacement, the pause record."""

import os
import stat

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    PrivateDir,
    check_plain_name,
    check_trusted_directory,
    create_exclusive,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive, this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.scratch import scratch_bytes, scratch_shares
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.state import VmState


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_private_dir_is_made_0700_and_a_loose_one_is_refused(tmp_path):
    made = PrivateDir(str(tmp_path / "a" / "b")).ensure()
    assert mode(made.path) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    with pytest.raises(UserError, match="has mode 755: others could have put files there"):
        PrivateDir(str(loose)).ensure()
    # A read-only run (check mode) creates nothing, and finds nothing in a directory that is not there.
    missing = PrivateDir(str(tmp_path / "missing")).prepare(create=False)
    assert missing.read_json("x.json") is None and not os.path.exists(missing.path)


def test_a_private_dir_that_is_a_symlink_or_someone_elses_is_refused(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UserError, match="not a directory"):
        PrivateDir(str(tmp_path / "link")).ensure()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    with pytest.raises(UserError, match="belongs to uid 65534"):
        PrivateDir(str(foreign)).ensure()


def test_json_files_are_0600_replaced_atomically_and_never_read_through_a_symlink(tmp_path):
    directory = PrivateDir(str(tmp_path / "state")).ensure()
    old_umask = os.umask(0)
    try:
        directory.write_json("x.json", {"a": 1})
    finally:
        os.umask(old_umask)
    assert mode(directory.path_of("x.json")) == 0o600 and directory.read_json("x.json") == {"a": 1}
    directory.write_json("x.json", {"a": 2})
    assert directory.read_json("x.json") == {"a": 2} and os.listdir(directory.path) == ["x.json"]
    secret = tmp_path / "secret"
    secret.write_text('{"planted": true}')
    os.symlink(secret, directory.path_of("planted.json"))
    with pytest.raises(UserError, match="not a file that fleetbackup made"):
        directory.read_json("planted.json")
    assert directory.read_json("missing.json") is None


def test_exclusive_creation_refuses_existing_files_and_symlinks(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(UserError, match="already exists"):
        create_exclusive(str(tmp_path), "link")
    assert not (tmp_path / "elsewhere").exists()
    created = create_exclusive(str(tmp_path), "new")
    os.close(created.fd)
    assert mode(created.path) == 0o600
    with pytest.raises(UserError, match="already exists"):
        create_exclusive(str(tmp_path), "new")


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "", "x" * 300, None])
def test_names_from_files_must_be_plain(name):
    with pytest.raises(UserError, match="not a plain file name"):
        check_plain_name(name, "Disk name")


def test_a_shared_directory_is_refused_unless_sticky(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match="not sticky"):
        check_trusted_directory(str(shared), "scratch_dir", "room")
    shared.chmod(0o1777)
    check_trusted_directory(str(shared), "scratch_dir", "room")


@pytest.mark.parametrize("setting,size,expected", [("10%", 1000, 100), ("0", 1000, 0), ("2G", 1, 2 << 30),
                                                   ("512M", 1, 512 << 20), ("12.5%", 800, 100)])
def test_scratch_size_is_a_size_or_a_share_of_the_disks(setting, size, expected):
    assert scratch_bytes(setting, size) == expected


def test_the_scratch_room_is_shared_by_disk_size_in_whole_clusters():
    assert scratch_shares(100 << 20, [3 << 30, 1 << 30]) == [75 << 20, 25 << 20]
    assert scratch_shares(0, [1 << 30, 1 << 30]) == [1 << 20, 1 << 20]  # room for the image's own tables
    assert all(share % 65536 == 0 for share in scratch_shares(1000003, [7, 11, 13]))


def test_a_pause_record_is_abandoned_only_when_its_process_is_gone(tmp_path):
    state = VmState(str(tmp_path / "state"), "qmp-x", "test VM")
    state.record_pause("b1")
    assert state.abandoned_pause() is None  # we are alive
    record = state.dir.read_json("paused.json")
    record["owner"]["started"] -= 1  # the same PID, but another process: it died and the PID was reused
    state.dir.write_json("paused.json", record)
    assert state.abandoned_pause()["backup_id"] == "b1"
    state.forget_pause()
    assert state.abandoned_pause() is None
    assert process_alive(this_process())
