"""Disk discovery, plans, names and the bitmap transaction, against a fake monitor."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import (
    BackupPlan,
    EXPORT_NAME,
    check_backup_id,
    check_request,
    export_names,
    nbd_url,
    request_differences,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.point_in_time import describe_view, parse_view
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.fleecing import _freeze_bitmaps
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qmp_objects import QmpBackupNames
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import list_disks, select_disks

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


def request(**overrides):
    values = dict(disks=None, checkpoint=None, incremental=None, fallback_to_full=False, scratch_dir="/s",
                  nbd_socket=None, nbd_tcp=None, cbw_timeout=10, scratch_size="10%", libvirt_small_scratch=False,
                  freeze="auto", guest_agent_socket=None, freeze_timeout=10)
    values.update(overrides)
    return values


def plan(qmp, backup_id="b1", wanted=None, **overrides):
    disks = select_disks(list_disks(qmp), wanted)
    return BackupPlan(backup_id, disks, request(disks=wanted, **overrides), REGISTRY, "/s/nbd.sock")


def test_disks_are_named_by_qdev_id_and_empty_drives_are_skipped():
    disks = list_disks(fake_vm())
    assert [(d.name, d.node, d.root, d.format) for d in disks] == [
        ("vda", "disk0", "disk0", "qcow2"), ("sd1", "#block123", "#block123", "raw"),
        ("cd0", "#block200", "#block200", "raw")]


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


def test_qemu_names_fit_qemu_limits_and_ownership_is_exact():
    names = QmpBackupNames("x" * 32)
    assert max(len(node) for node in names.nodes(99)) <= 31
    assert names.owns_export("fb-%s-0" % ("x" * 32)) and names.owns_export("fb-%s-p3" % ("x" * 32))
    short = QmpBackupNames("a")
    assert short.owns_export("fb-a-3") and not short.owns_export("fb-a-b-3") and not short.owns_export("fb-ab-3")
    assert not set(short.nodes(1)) & set(QmpBackupNames("b").nodes(1))


def test_export_names_carry_the_backup_the_start_and_the_disk():
    class D:
        def __init__(self, name):
            self.name = name
    assert export_names([D("vda"), D("a/b c"), D("vda")]) == ["vda", "a_b_c", "vda_2"]
    assert nbd_url("b1/0a1b2c3d/vda", "/tmp/x y.nbd") == "nbd+unix:///b1/0a1b2c3d/vda?socket=/tmp/x%20y.nbd"
    first, second = plan(fake_vm()), plan(fake_vm())
    export = first.result()["disks"][0]["export"]
    assert EXPORT_NAME.match(export).group("backup_id", "disk") == ("b1", "vda")
    # The same backup id started again (the next night) is another backup.
    assert export != second.result()["disks"][0]["export"]


def test_the_view_description_round_trips_and_foreign_ones_are_ignored():
    text = describe_view("b1", "vda", "b1/0a1b2c3d/vda", "/scratch", 10)
    assert parse_view(text) == dict(backup="b1", disk="vda", probe="b1/0a1b2c3d/vda/intact", scratch_dir="/scratch",
                                    cbw_timeout=10)
    assert parse_view("some qemu-nbd export") is None and parse_view(None) is None


def test_incremental_bitmaps_freeze_in_one_transaction_with_the_new_checkpoint():
    qmp = fake_vm(bitmaps=[bitmap("c1", count=65536, granularity=131072)])
    qmp.answers["transaction"] = {}
    planned = plan(qmp, "b2", ["vda"], checkpoint="c2", incremental="c1")
    _freeze_bitmaps(qmp, QmpBackupNames("b2"), planned)
    (command, arguments), = [c for c in qmp.commands if c[0] == "transaction"]
    actions = [(a["type"], a["data"]["name"] if "name" in a["data"] else a["data"]["target"])
               for a in arguments["actions"]]
    assert actions == [("block-dirty-bitmap-add", "fb-b2"), ("block-dirty-bitmap-merge", "fb-b2"),
                       ("block-dirty-bitmap-add", "c2")]
    temp = arguments["actions"][0]["data"]
    assert temp["disabled"] is True and temp["granularity"] == 131072 and temp["persistent"] is False
    disk = planned.result()["disks"][0]
    assert disk["mode"] == "incremental" and disk["dirty_bitmap"] == "qemu:dirty-bitmap:fb-b2"


def test_a_full_backup_without_checkpoint_needs_no_transaction():
    qmp = fake_vm()
    _freeze_bitmaps(qmp, QmpBackupNames("b1"), plan(qmp))
    assert "transaction" not in [command for command, _arguments in qmp.commands]


def test_incremental_problems_fail_or_fall_back_per_disk():
    qmp = fake_vm(bitmaps=[bitmap("c1", inconsistent=True)])
    with pytest.raises(UserError, match="inconsistent.*fallback_to_full"):
        plan(qmp, "b3", ["vda"], incremental="c1")
    planned = plan(qmp, "b3", incremental="c1", fallback_to_full=True)
    assert [(d["disk"], d["mode"]) for d in planned.result()["disks"]] == [("vda", "full"), ("sd1", "full")]
    assert "inconsistent" in planned.result()["disks"][0]["reason"]
    assert "raw, which cannot hold checkpoints" in planned.result()["disks"][1]["reason"]


def test_a_raw_disk_fails_a_checkpoint_or_is_backed_up_in_full_without_one():
    qmp = fake_vm(bitmaps=[bitmap("c1")])
    with pytest.raises(UserError, match="persistent dirty bitmaps need qcow2"):
        plan(qmp, "b4", ["sd1"], checkpoint="c9")
    with pytest.raises(UserError, match="already exists"):
        plan(qmp, "b4", ["vda"], checkpoint="c1")
    mixed = plan(qmp, "b4", checkpoint="c9", fallback_to_full=True).result()["disks"]
    assert [(d["disk"], d["checkpoint"]) for d in mixed] == [("vda", True), ("sd1", False)]
    assert "backed up in full every time" in mixed[1]["reason"]


def test_a_resize_since_the_checkpoint_is_a_reason_for_a_full_backup(tmp_path):
    registry = CheckpointRegistry(str(tmp_path / "registry"))
    disk = list_disks(fake_vm(bitmaps=[bitmap("c1")]))[0]
    registry.record([disk._replace(size=disk.size // 2)], "c1")
    qmp = fake_vm(bitmaps=[bitmap("c1")])
    chosen = select_disks(list_disks(qmp), ["vda"])
    with pytest.raises(UserError, match="resized from 536870912 to 1073741824 bytes since checkpoint 'c1'"):
        BackupPlan("b5", chosen, request(incremental="c1"), registry, "/s/x.nbd")
    registry.forget([disk.filename], "c1")
    planned = BackupPlan("b5", chosen, request(incremental="c1"), registry, "/s/x.nbd")
    assert planned.result()["disks"][0]["mode"] == "incremental"


def test_a_second_start_must_ask_for_the_same_backup():
    assert request_differences(request(), request()) == []
    assert request_differences(request(), request(checkpoint="c1", scratch_size="1G", cbw_timeout=5)) == [
        "checkpoint", "scratch_size", "cbw_timeout"]


def test_a_qom_set_error_is_checked_against_what_is_attached():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qmp_objects import set_drive

    def refuse(arguments):
        raise QmpCommandError("qom-set", "GenericError", "reported, whatever happened")

    swapped = FakeQmp({"qom-set": refuse, "query-block": [block_device("vda", "filter0")]})
    set_drive(swapped, "vda", "filter0")  # QEMU said no, yet swapped: the device is where we wanted it
    unchanged = FakeQmp({"qom-set": refuse, "query-block": [block_device("vda", "disk0")]})
    with pytest.raises(QmpCommandError, match="reported"):
        set_drive(unchanged, "vda", "filter0")


def schema(cbw_members, drivers):
    return [{"name": "1", "meta-type": "object", "members": [{"name": m, "type": "str"} for m in cbw_members]},
            {"name": "2", "meta-type": "enum", "values": list(drivers)}]


def test_a_qemu_without_break_snapshot_is_refused_naming_the_version_needed():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.qmp_objects import check_fleecing_support

    version = {"qemu": {"major": 7, "minor": 0, "micro": 0}}
    old = FakeQmp({"query-qmp-schema": schema(["file", "target"], ["qcow2", "copy-before-write"]),
                   "query-version": version})
    with pytest.raises(UserError, match="QEMU 7.0.0 cannot fleece without risk.*Upgrade QEMU to 7.1"):
        check_fleecing_support(old)
    new = FakeQmp({"query-qmp-schema": schema(["on-cbw-error", "cbw-timeout"], ["qcow2", "snapshot-access"]),
                   "query-version": version})
    check_fleecing_support(new)


def tcp(**overrides):
    values = dict(host="192.0.2.11", port=0, tls_dir="/etc/fleetbackup/tls", tls_allow=["O=fleet,OU=client,CN=backup1"],
                  plain=False)
    values.update(overrides)
    return values


def test_tcp_urls_carry_the_listening_address_and_the_port_it_got():
    planned = plan(fake_vm(), wanted=["vda"], nbd_tcp=tcp())
    planned.port = 40813
    result = planned.result()
    assert result["nbd_tcp"] == dict(host="192.0.2.11", port=40813, tls=True) and result["nbd_socket"] == "/s/nbd.sock"
    assert result["disks"][0]["url"] == "nbds://192.0.2.11:40813/b1/%s/vda" % planned.tag
    ipv6 = plan(fake_vm(), wanted=["vda"], nbd_tcp=tcp(host="::1", tls_dir=None, tls_allow=None, plain=True))
    assert ipv6.result()["disks"][0]["url"] == "nbd://[::1]:0/b1/%s/vda" % ipv6.tag
    assert request_differences(request(nbd_tcp=tcp()), request(nbd_tcp=tcp(port=10809))) == ["nbd_tcp"]


@pytest.mark.parametrize("overrides,message", [
    (dict(host="hv1.example.com"), "is not an IP address"),
    (dict(host="::"), "listens on every address"),
    (dict(host="fe80::1%eth0"), "has a zone (%eth0)"),
    (dict(port=70000), "is no TCP port"),
    (dict(tls_dir=None), "nbd_tcp needs tls_dir"),
    (dict(tls_allow=[]), "nbd_tcp.tls_allow is empty"),
    (dict(plain=True, tls_dir=None, tls_allow=None), "Plain TCP (nbd_tcp.plain) is refused on 192.0.2.11"),
    (dict(plain=True), "nbd_tcp.plain turns TLS off"),
])
def test_tcp_listeners_without_tls_or_a_reachable_address_are_refused(overrides, message):
    with pytest.raises(UserError) as failure:
        check_request(request(nbd_tcp=tcp(**overrides)))
    assert message in str(failure.value)
    check_request(request(nbd_tcp=tcp(host="127.0.0.1", plain=True, tls_dir=None, tls_allow=None)))


def test_libvirt_domains_refuse_tcp_before_touching_anything():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.libvirt_pull import LibvirtPull
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.vm import LibvirtVm

    domain = LibvirtVm("qemu:///system", "web1", 10, "/nonexistent/state", "/nonexistent/qemu", REGISTRY)
    with pytest.raises(UserError, match="nbd_tcp is not available for libvirt domains: libvirt's backup server"):
        LibvirtPull(domain).plan("b1", request(nbd_tcp=tcp()))
