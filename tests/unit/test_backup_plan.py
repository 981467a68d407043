"""Disk discovery, naming and the start transaction, against a fake monitor."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils.backup_session import (
    BackupNames,
    check_backup_id,
    export_names,
    nbd_url,
    plan_backup,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.vm_disks import list_disks, select_disks

from fake_qmp import FakeQmp, bitmap, block_device, named_node


REGISTRY = CheckpointRegistry("/nonexistent/registry")


def fake_vm(bitmaps=()):
    return FakeQmp({
        "query-block": [
            block_device("/machine/peripheral/vda/virtio-backend", "disk0"),
            block_device("sd1", "#block123", drv="raw", device="drive1"),
            block_device("cd0", "#block200", drv="raw", ro=True, device="cdrom"),
            {"device": "floppy", "qdev": "fd0"},
        ],
        "query-named-block-nodes": [named_node("disk0", bitmaps=bitmaps), named_node("#block123", "raw"),
                                    named_node("#block200", "raw")],
    })


def test_disks_are_named_by_qdev_id_and_empty_drives_are_skipped():
    disks = list_disks(fake_vm())
    assert [(d.name, d.node, d.format) for d in disks] == [
        ("vda", "disk0", "qcow2"), ("sd1", "#block123", "raw"), ("cd0", "#block200", "raw")]


def test_default_selection_is_every_writable_disk_and_any_id_selects():
    disks = list_disks(fake_vm())
    assert [d.name for d in select_disks(disks, None)] == ["vda", "sd1"]
    assert [d.name for d in select_disks(disks, ["drive1", "disk0", "vda"])] == ["sd1", "vda"]
    with pytest.raises(LookupError, match="Unknown disk 'nope'.*vda"):
        select_disks(disks, ["nope"])


def test_a_block_job_bitmap_without_a_name_is_no_checkpoint():
    qmp = fake_vm(bitmaps=[bitmap("c1"), {"count": 0, "granularity": 65536, "busy": False}])
    assert list(list_disks(qmp)[0].bitmaps) == ["c1"]


@pytest.mark.parametrize("bad", ["", "a b", "x" * 33, "a/b", "a.b"])
def test_invalid_backup_ids_are_refused(bad):
    with pytest.raises(UserError, match="Invalid backup_id"):
        check_backup_id(bad)


def test_names_fit_qemu_limits_and_ownership_is_exact():
    names = BackupNames("x" * 32, "/var/tmp")
    assert len(names.scratch_node(99)) <= 31
    assert names.owns("fb-%s-0" % ("x" * 32))
    short = BackupNames("a", "/s")
    assert short.owns("fb-a-3") and not short.owns("fb-a-b-3") and not short.owns("fb-ab-3")
    assert short.owns_node(short.scratch_node(1)) and not short.owns_node(BackupNames("b", "/s").scratch_node(1))


def test_export_names_are_unique_and_url_safe():
    class D:
        def __init__(self, name):
            self.name = name
    assert export_names([D("vda"), D("a/b c"), D("vda")]) == ["vda", "a_b_c", "vda_2"]
    assert nbd_url("vda", "/tmp/x y.nbd") == "nbd+unix:///vda?socket=/tmp/x%20y.nbd"


def test_incremental_transaction_freezes_the_bitmap_with_the_fleecing():
    qmp = fake_vm(bitmaps=[bitmap("c1", count=65536, granularity=131072)])
    names = BackupNames("b2", "/s")
    plan = plan_backup(qmp, names, ["vda"], "/s/b2.nbd", REGISTRY, checkpoint="c2", incremental="c1")
    kinds = [(kind, data.get("job-id") or data.get("name") or data.get("target"))
             for kind, data in plan.transaction_actions()]
    assert kinds == [("block-dirty-bitmap-add", "fb-b2"), ("block-dirty-bitmap-merge", "fb-b2"),
                     ("block-dirty-bitmap-add", "c2"), ("blockdev-backup", "fb-b2-0")]
    temp = plan.transaction_actions()[0][1]
    assert temp["disabled"] is True and temp["granularity"] == 131072 and temp["persistent"] is False
    disk = plan.result()["disks"][0]
    assert disk["mode"] == "incremental" and disk["dirty_bitmap"] == "qemu:dirty-bitmap:fb-b2"


def test_incremental_problems_fail_or_fall_back_per_disk():
    qmp = fake_vm(bitmaps=[bitmap("c1", inconsistent=True)])
    names = BackupNames("b3", "/s")
    with pytest.raises(UserError, match="inconsistent.*fallback_to_full"):
        plan_backup(qmp, names, ["vda"], "/s/x.nbd", REGISTRY, incremental="c1")
    plan = plan_backup(qmp, names, None, "/s/x.nbd", REGISTRY, incremental="c1", fallback_to_full=True)
    assert [(d["disk"], d["mode"]) for d in plan.result()["disks"]] == [("vda", "full"), ("sd1", "full")]
    assert "inconsistent" in plan.result()["disks"][0]["reason"]
    assert "does not exist" in plan.result()["disks"][1]["reason"]


def test_checkpoints_need_qcow2_and_a_new_name():
    qmp = fake_vm(bitmaps=[bitmap("c1")])
    names = BackupNames("b4", "/s")
    with pytest.raises(UserError, match="persistent dirty bitmaps need qcow2"):
        plan_backup(qmp, names, ["sd1"], "/s/x.nbd", REGISTRY, checkpoint="c9")
    with pytest.raises(UserError, match="already exists"):
        plan_backup(qmp, names, ["vda"], "/s/x.nbd", REGISTRY, checkpoint="c1")


def test_a_resize_since_the_checkpoint_is_a_reason_for_a_full_backup(tmp_path):
    registry = CheckpointRegistry(str(tmp_path))
    disk = list_disks(fake_vm(bitmaps=[bitmap("c1")]))[0]
    registry.record([disk._replace(size=disk.size // 2)], "c1")
    qmp = fake_vm(bitmaps=[bitmap("c1")])
    with pytest.raises(UserError, match="resized from 536870912 to 1073741824 bytes since checkpoint 'c1'"):
        plan_backup(qmp, BackupNames("b5", "/s"), ["vda"], "/s/x.nbd", registry, incremental="c1")
    registry.forget([disk.filename], "c1")
    plan = plan_backup(qmp, BackupNames("b5", "/s"), ["vda"], "/s/x.nbd", registry, incremental="c1")
    assert plan.result()["disks"][0]["mode"] == "incremental"
