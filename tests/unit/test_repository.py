"""The repository's decisions: when a run is due, which level, what to prune, who holds the lease."""

import json
import os

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.lease import Lease
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import (
    backup_id_for,
    chain_facts,
    chains_beyond,
    not_due,
    obsolete_checkpoints,
    parse_duration,
    plan,
    plan_from,
    record,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository

NOW = 1_800_000_000


def vm_disk(name="vda", size=1 << 30, checkpoints=(), read_only=False, image_format="qcow2"):
    return dict(disk=name, node=name + "-node", size=size, read_only=read_only, format=image_format, checkpoints=[
        dict(name=c, dirty_bytes=65536, usable=usable) for c, usable in checkpoints])


def backup(name, level="full", chain=None, checkpoint=None, finished=NOW - 7200, size=1 << 30, parent=None):
    return dict(name=name, level=level, chain=chain or name, checkpoint=checkpoint or "ckpt-" + name,
                finished=finished, parent=parent, disks=[dict(disk="vda", file=name + ".vda.qcow2", size=size)])


@pytest.fixture
def repository(tmp_path):
    """A repository whose manifest lists what a test puts in data; images exist for the backups listed."""
    repo = Repository(str(tmp_path), "vm")
    os.makedirs(repo.path)
    return repo


def with_images(repository, data):
    for entry in data["backups"]:
        for disk in entry["disks"]:
            open(repository.image(disk["file"]), "w").close()
    return data


@pytest.mark.parametrize("text,seconds", [("0", 0), ("90", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                          (" 2w ", 1209600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration_says_what_is_accepted():
    with pytest.raises(UserError, match="12h"):
        parse_duration("soon")


def test_backup_ids_fit_qemu_and_differ_per_vm():
    first = backup_id_for("web-server.example.org", "20261129T020000Z-3f2a")
    second = backup_id_for("web", "20261129T020000Z-3f2a")
    assert len(first) <= 32 and first != second


def test_first_run_is_full_and_a_young_backup_means_nothing_is_due(repository):
    data = dict(backups=[])
    planned = plan(repository, data, "auto", 3600, [vm_disk(), vm_disk("cdrom", read_only=True)], None, NOW)
    assert (planned["level"], planned["incremental"], [d["disk"] for d in planned["disks"]]) == ("full", None, ["vda"])
    data["backups"].append(backup("b1", finished=NOW - 60))
    assert plan(repository, data, "auto", 3600, [vm_disk()], None, NOW)["due"] is False


def test_the_plan_selects_disks_as_the_start_does_by_name_or_node_in_the_order_given_and_each_once(repository):
    disks = [vm_disk(), vm_disk("vdb"), vm_disk("cdrom", read_only=True)]
    planned = plan(repository, dict(backups=[]), "full", 0, disks, ["vdb", "vda-node", "vda"], NOW)
    assert [d["disk"] for d in planned["disks"]] == ["vdb", "vda"]
    with pytest.raises(UserError, match=r"disks \['vdz', 'vda'\] are not on VM vm; its disks are: vda, vdb, cdrom\."):
        plan(repository, dict(backups=[]), "full", 0, disks, ["vdz", "vda"], NOW)


def test_names_are_unique_within_one_second(repository):
    # Each run in the same second sees the backups before it in the manifest, as runs under the lease do.
    data = dict(backups=[])
    for _run in range(50):
        data["backups"].append(backup(plan(repository, data, "full", 0, [vm_disk()], None, NOW)["name"]))
    names = {entry["name"] for entry in data["backups"]}
    assert len(names) == 50 and all(name.startswith("20270115T080000Z-") for name in names)


def test_auto_continues_the_chain_only_while_its_checkpoint_is_usable(repository):
    data = with_images(repository, dict(backups=[backup("b1")]))
    good = plan(repository, data, "auto", 0, [vm_disk(checkpoints=[("ckpt-b1", True)])], None, NOW)
    assert (good["level"], good["parent"], good["incremental"]) == ("incremental", "b1", "ckpt-b1")
    assert good["disks"][0]["backing"] == "b1.vda.qcow2" and good["disks"][0]["backing_format"] == "qcow2"
    assert good["expected_bytes"] == 65536
    for disks, reason in (([vm_disk()], "missing"), ([vm_disk(checkpoints=[("ckpt-b1", False)])], "cannot be used"),
                          ([vm_disk(size=2 << 30, checkpoints=[("ckpt-b1", True)])], "resized"),
                          ([vm_disk(checkpoints=[("ckpt-b1", True)]), vm_disk("vdb")], "disks changed")):
        fallback = plan(repository, data, "auto", 0, disks, None, NOW)
        assert fallback["level"] == "full" and reason in fallback["reason"]
        with pytest.raises(UserError, match=reason):
            plan(repository, data, "incremental", 0, disks, None, NOW)


def test_a_missing_image_of_the_chain_makes_auto_take_a_full_backup(repository):
    data = with_images(repository, dict(backups=[backup("b1"), backup("b2", "incremental", "b1", parent="b1")]))
    disks = [vm_disk(checkpoints=[("ckpt-b2", True)])]
    assert plan(repository, data, "auto", 0, disks, None, NOW)["level"] == "incremental"
    os.unlink(repository.image("b1.vda.qcow2"))
    planned = plan(repository, data, "auto", 0, disks, None, NOW)
    assert planned["level"] == "full" and "b1.vda.qcow2, which the chain of b2 needs, is missing" in planned["reason"]


def test_a_raw_disk_is_full_in_every_backup_while_the_qcow2_disks_continue(repository):
    data = dict(backups=[backup("b1")])
    data["backups"][0]["disks"].append(dict(disk="sdb", file="b1.sdb.qcow2", size=1 << 20))
    with_images(repository, data)
    disks = [vm_disk(checkpoints=[("ckpt-b1", True)]), vm_disk("sdb", size=1 << 20, image_format="raw")]
    planned = plan(repository, data, "auto", 0, disks, None, NOW)
    assert planned["level"] == "incremental"
    vda, sdb = planned["disks"]
    assert (vda["backing"], sdb["backing"]) == ("b1.vda.qcow2", None)
    assert "raw disk is backed up in full every time" in sdb["reason"] and sdb["expected_bytes"] == 1 << 20
    entry = record(data, planned, [dict(disk="vda", mode="incremental"), dict(disk="sdb", mode="full")],
                   [dict(disk="vda", bytes_read=1), dict(disk="sdb", bytes_read=2)], NOW)
    assert entry["level"] == "incremental" and [d["backing"] for d in entry["disks"]] == ["b1.vda.qcow2", None]
    only_raw = plan(repository, dict(backups=[]), "auto", 0, disks[1:], None, NOW)
    assert only_raw["level"] == "full"


def test_record_uses_what_the_start_really_did_and_prune_drops_whole_chains(repository):
    data = with_images(repository, dict(backups=[backup("b1")]))
    planned = plan(repository, data, "auto", 0, [vm_disk(checkpoints=[("ckpt-b1", True)])], None, NOW)
    # Results of the copy module (also as async_status returns them) are matched to their disk by their image.
    copy_result = dict(image="/backup/vm1/" + planned["disks"][0]["file"], bytes_read=7, checksum="sha256-blocks64k:0a")
    entry = record(data, planned, [dict(disk="vda", mode="full")], [copy_result], NOW)
    assert (entry["level"], entry["chain"], entry["parent"]) == ("full", entry["name"], None)
    assert [(d["bytes_read"], d["checksum"]) for d in entry["disks"]] == [(7, "sha256-blocks64k:0a")]
    with pytest.raises(UserError, match="not copied"):
        record(dict(backups=[]), planned, [dict(disk="vda", mode="full")], [], NOW)
    data = dict(backups=[backup("a1"), backup("a2", "incremental", "a1"), backup("b1"), backup("c1")])
    assert chains_beyond(data["backups"], 2) == ["a1", "a2"]
    pruned, data["backups"] = data["backups"][:2], data["backups"][2:]
    assert obsolete_checkpoints(data, pruned) == ["ckpt-a1", "ckpt-a2", "ckpt-b1"]
    assert chains_beyond(data["backups"], 0) == []


def test_record_keeps_the_planned_levels_but_where_the_start_fell_back_and_pairs_copies_with_the_starts_disks(
        repository):
    data = dict(backups=[backup("b1")])
    data["backups"][0]["disks"].append(dict(disk="vdb", file="b1.vdb.qcow2", size=1 << 30))
    with_images(repository, data)
    disks = [vm_disk(checkpoints=[("ckpt-b1", True)]), vm_disk("vdb", checkpoints=[("ckpt-b1", True)])]
    planned = plan(repository, data, "auto", 0, disks, None, NOW)
    assert [(d["disk"], d["mode"]) for d in planned["disks"]] == [("vda", "incremental"), ("vdb", "incremental")]
    # The start lists its disks in its own order; vda's checkpoint turned out unusable (fallback_to_full).
    started = [dict(disk="vdb", mode="incremental"), dict(disk="vda", mode="full")]
    with pytest.raises(UserError, match="disks vdb were not copied"):
        record(data, planned, started, [dict(disk="vda", bytes_read=2), dict(bytes_read=1)], NOW)
    entry = record(data, planned, started, [dict(bytes_read=2), dict(bytes_read=1)], NOW)
    assert [(d["disk"], d["mode"], d["backing"], d["bytes_read"]) for d in entry["disks"]] == [
        ("vda", "full", None, 1), ("vdb", "incremental", "b1.vdb.qcow2", 2)]
    assert (entry["level"], entry["parent"], entry["chain"]) == ("incremental", "b1", "b1")


@pytest.mark.parametrize("field,value", [("file", "../../etc/passwd"), ("file", "/etc/passwd"), ("disk", "a/b")])
def test_a_manifest_naming_a_path_outside_the_vm_directory_is_refused(repository, field, value):
    data = dict(format=1, vm="vm", backups=[backup("b1")])
    data["backups"][0]["disks"][0][field] = value
    with open(repository.manifest_path, "w") as stream:
        json.dump(data, stream)
    expected = r"does not match its schema: backups\[0\]\.disks\[0\]\.%s is .*, expected a plain file name" % field
    with pytest.raises(UserError, match=expected):
        repository.load()


@pytest.mark.parametrize("vm", ["..", "a/b", "../other", ""])
def test_a_vm_name_must_be_plain(tmp_path, vm):
    with pytest.raises(UserError, match="VM name"):
        Repository(str(tmp_path), vm)


def test_the_lease_is_one_run_at_a_time_until_it_expires(repository):
    lease = Lease(repository)
    first = lease.take("run1", "hourly play", 600, NOW)
    assert first["expires"] == NOW + 600 and first["taken_over"] is None
    with pytest.raises(UserError, match="locked by another run: nightly|locked by another run: hourly play"):
        lease.take("run2", "nightly play", 600, NOW + 10)
    renewed = lease.take("run1", "hourly play", 600, NOW + 300)
    assert renewed["taken"] == NOW and renewed["expires"] == NOW + 900
    lease.check("run1", NOW + 899)
    with pytest.raises(UserError, match="no longer holds the lease"):
        lease.check("run2", NOW + 10)
    # run1 died: once its lease expired, another run takes it over, and run1 may no longer write.
    later = lease.take("run2", "nightly play", 600, NOW + 901)
    assert later["taken_over"]["run_id"] == "run1"
    with pytest.raises(UserError, match="no longer holds the lease"):
        lease.check("run1", NOW + 902)
    assert lease.release("run1") is False and lease.release("run2") is True
    assert lease.take("run3", "x", 600, NOW + 903)["run_id"] == "run3"


def test_a_manifest_whose_parents_loop_is_refused_and_verified_without_looping():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.chains import chain_of, images_needed

    disk = dict(disk="vda", file="x.qcow2", backing="x.qcow2")
    looped = dict(backups=[dict(name="a", parent="b", disks=[disk]), dict(name="b", parent="a", disks=[disk])])
    with pytest.raises(UserError, match="parents lead back to a, a loop"):
        chain_of(looped, looped["backups"][0])
    assert [member["name"] for member, _disk in images_needed(looped, looped["backups"][0])] == ["a", "b"]


def test_record_pairs_each_copy_with_the_disk_whose_image_it_wrote_whatever_their_order(repository):
    data = dict(backups=[backup("b1")])
    data["backups"][0]["disks"].append(dict(disk="vdb", file="b1.vdb.qcow2", size=1 << 30))
    with_images(repository, data)
    disks = [vm_disk(checkpoints=[("ckpt-b1", True)]), vm_disk("vdb", checkpoints=[("ckpt-b1", True)])]
    planned = plan(repository, data, "auto", 0, disks, None, NOW)
    started = [dict(disk="vda", mode="incremental"), dict(disk="vdb", mode="incremental")]
    image = {d["disk"]: os.path.join(repository.path, d["file"]) for d in planned["disks"]}
    # The copies came back in the other order: each is of the disk whose image it wrote, not of its place.
    copies = [dict(image=image["vdb"], bytes_read=2, checksum="vdb's"),
              dict(image=image["vda"], bytes_read=1, checksum="vda's")]
    entry = record(data, planned, started, copies, NOW, directory=repository.path)
    assert [(d["disk"], d["checksum"]) for d in entry["disks"]] == [("vda", "vda's"), ("vdb", "vdb's")]
    with pytest.raises(UserError, match="a copy wrote /elsewhere/b.qcow2, which is no image of it"):
        record(data, planned, started, [dict(image="/elsewhere/b.qcow2", bytes_read=1)] + copies[1:], NOW,
               directory=repository.path)
    # The plan backs up a disk in full only where no incremental can be: a start that did one is not recorded.
    planned["disks"][1]["mode"] = "full"
    with pytest.raises(UserError, match="the plan backs up disks vdb in full, and the start did not"):
        record(data, planned, started, copies, NOW, directory=repository.path)


def test_a_lease_whose_process_is_gone_from_this_host_is_free_at_once_and_names_its_work(repository):
    lease = Lease(repository)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    gone = dict(this_process(), pid=child, started=-1)  # a process of this host that no longer runs
    lease.take("dead", "hourly play", 600, NOW, owner=gone, work=dict(name="b1", backup_id="vm-1", files=["f"]))
    taken = lease.take("next", "hourly play", 600, NOW + 1)
    assert taken["taken_over"]["run_id"] == "dead" and taken["taken_over"]["work"]["files"] == ["f"]
    # Another host's process is never judged from here: its lease holds until it expires.
    assert lease.release("next")
    lease.take("remote", "x", 600, NOW + 2, owner=dict(gone, host="elsewhere"))
    with pytest.raises(UserError, match="locked by another run"):
        lease.take("third", "x", 600, NOW + 3)
    # A live owner holds it too.
    assert lease.release("remote")
    lease.take("alive", "x", 600, NOW + 5, owner=this_process())
    with pytest.raises(UserError, match="locked by another run: x"):
        lease.take("fourth", "x", 600, NOW + 6)


def test_the_facts_a_plan_needs_travel_as_plain_data_and_plan_alike(repository):
    data = with_images(repository, dict(backups=[backup("b1")]))
    facts = chain_facts(repository, data, NOW)
    travelled = json.loads(json.dumps(facts))
    disks = [vm_disk(checkpoints=[("ckpt-b1", True)])]
    planned = plan_from(travelled, "auto", 0, disks, None, NOW)
    assert planned["level"] == "incremental" and planned["name"] == facts["name"]
    assert planned["backup_id"] == backup_id_for("vm", facts["name"])
    assert facts["checkpoints"] == ["ckpt-b1"] and facts["missing"] is None
    os.unlink(repository.image("b1.vda.qcow2"))
    assert "is missing from the repository" in plan_from(chain_facts(repository, data, NOW), "auto", 0, disks, None,
                                                         NOW)["reason"]
    assert "younger than max_age" in not_due(facts, 3 * 3600, NOW) and not_due(facts, 3 * 3600, NOW + 3600) is None


def test_a_failed_runs_discard_removes_only_that_backups_own_unlisted_files(repository):
    data = with_images(repository, dict(format=1, vm="vm", backups=[backup("b1")]))
    repository.save(data)
    for name in ("b2.vda.qcow2", "b2.domain.xml", "lock", "b3.vda.qcow2"):
        open(repository.image(name), "w").close()
    # Whatever names it is handed (a forged plan's), only b2's files go: never the manifest, the lease, b1 or b3.
    removed = repository.discard_unlisted("b2", ["manifest.json", "lock", "b1.vda.qcow2", "b3.vda.qcow2",
                                                 "b2.vda.qcow2"])
    assert sorted(removed) == ["b2.domain.xml", "b2.vda.qcow2"]
    assert sorted(os.listdir(repository.path)) == ["b1.vda.qcow2", "b3.vda.qcow2", "lock", "manifest.json"]
