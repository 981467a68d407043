"""The repository's decisions: when a run is due, which level, what to prune."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.repository import (
    backup_id_for,
    obsolete_checkpoints,
    parse_duration,
    plan,
    prune,
    record,
)

NOW = 1_800_000_000


def vm_disk(name="vda", size=1 << 30, checkpoints=(), read_only=False):
    return dict(disk=name, node=name + "-node", size=size, read_only=read_only, checkpoints=[
        dict(name=c, dirty_bytes=65536, usable=usable) for c, usable in checkpoints])


def backup(name, level="full", chain=None, checkpoint=None, finished=NOW - 7200, size=1 << 30):
    return dict(name=name, level=level, chain=chain or name, checkpoint=checkpoint or "ckpt-" + name,
                finished=finished, disks=[dict(disk="vda", file=name + ".vda.qcow2", size=size)])


@pytest.mark.parametrize("text,seconds", [("0", 0), ("90", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                          (" 2w ", 1209600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_duration_says_what_is_accepted():
    with pytest.raises(UserError, match="12h"):
        parse_duration("soon")


def test_backup_ids_fit_qemu_and_differ_per_vm():
    first = backup_id_for("web-server.example.org", "20261129T020000Z")
    second = backup_id_for("web", "20261129T020000Z")
    assert len(first) <= 32 and first != second


def test_first_run_is_full_and_a_young_backup_means_nothing_is_due():
    data = dict(backups=[])
    planned = plan(data, "vm", "auto", 3600, [vm_disk(), vm_disk("cdrom", read_only=True)], None, NOW)
    assert (planned["level"], planned["incremental"], [d["disk"] for d in planned["disks"]]) == ("full", None, ["vda"])
    data["backups"].append(backup("b1", finished=NOW - 60))
    assert plan(data, "vm", "auto", 3600, [vm_disk()], None, NOW)["due"] is False


def test_auto_continues_the_chain_only_while_its_checkpoint_is_usable():
    data = dict(backups=[backup("b1")])
    good = plan(data, "vm", "auto", 0, [vm_disk(checkpoints=[("ckpt-b1", True)])], None, NOW)
    assert (good["level"], good["parent"], good["incremental"]) == ("incremental", "b1", "ckpt-b1")
    assert good["disks"][0]["backing"] == "b1.vda.qcow2" and good["expected_bytes"] == 65536
    for disks, reason in (([vm_disk()], "missing"), ([vm_disk(checkpoints=[("ckpt-b1", False)])], "cannot be used"),
                          ([vm_disk(size=2 << 30, checkpoints=[("ckpt-b1", True)])], "resized"),
                          ([vm_disk(checkpoints=[("ckpt-b1", True)]), vm_disk("vdb")], "disks changed")):
        fallback = plan(data, "vm", "auto", 0, disks, None, NOW)
        assert fallback["level"] == "full" and reason in fallback["reason"]
        with pytest.raises(UserError, match=reason):
            plan(data, "vm", "incremental", 0, disks, None, NOW)


def test_record_uses_what_the_start_really_did_and_prune_drops_whole_chains():
    data = dict(backups=[backup("b1")])
    planned = plan(data, "vm", "auto", 0, [vm_disk(checkpoints=[("ckpt-b1", True)])], None, NOW)
    entry = record(data, planned, [dict(disk="vda", mode="full")], [dict(item=dict(disk="vda"), bytes_read=7)], NOW)
    assert (entry["level"], entry["chain"], entry["parent"]) == ("full", entry["name"], None)
    with pytest.raises(UserError, match="not copied"):
        record(dict(backups=[]), planned, [dict(disk="vda", mode="full")], [], NOW)
    data = dict(backups=[backup("a1"), backup("a2", "incremental", "a1"), backup("b1"), backup("c1")])
    pruned, files = prune(data, 2)
    assert [b["name"] for b in pruned] == ["a1", "a2"] and files == ["a1.vda.qcow2", "a2.vda.qcow2"]
    assert [b["name"] for b in data["backups"]] == ["b1", "c1"]
    assert obsolete_checkpoints(data, pruned) == ["ckpt-a1", "ckpt-a2", "ckpt-b1"]
    assert prune(data, 0) == ([], [])
