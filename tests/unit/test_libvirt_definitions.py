"""The XML that the libvirt connection writes and rewrites: backups, checkpoints, restored domains."""

from xml.etree import ElementTree

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils.backup_plan import BackupPlan
from ansible_collections.fleetbackup.qemu.plugins.module_utils.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils.domain_definition import (
    disk_sources,
    restored_domain_xml,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.libvirt_vm import backup_xml, checkpoint_xml
from ansible_collections.fleetbackup.qemu.plugins.module_utils.vm_disks import Disk

DOMAIN = """<domain type='kvm'>
  <name>web1</name>
  <uuid>6c0bd1a2-6c4e-4b1e-9d5c-1b0f6f0c0001</uuid>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/web1-root'/>
      <backingStore/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/srv/web1-data.qcow2'/>
      <target dev='vdb' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
  </devices>
</domain>"""


def qcow2_disk(name, bitmaps=None):
    return Disk(name=name, node=name, root=name, drive=name, qdev="ua-" + name, format="qcow2",
                filename="/srv/%s.qcow2" % name, size=1 << 30, read_only=False, bitmaps=bitmaps or {})


def test_a_restored_copy_under_a_new_name_gets_new_identity_and_only_restored_disks():
    xml, left_out = restored_domain_xml(DOMAIN, "web1-drill", {"vdb": ("/restore/vdb.qcow2", "qcow2")},
                                        "/restore/nvram.fd")
    root = ElementTree.fromstring(xml)
    assert root.findtext("name") == "web1-drill"
    assert root.find("uuid") is None and root.find("./devices/interface/mac") is None
    assert disk_sources(xml) == {"vdb": "/restore/vdb.qcow2"}  # the CD-ROM stays, no disk of the original
    assert root.findtext("./os/nvram") == "/restore/nvram.fd"
    assert left_out == ["disk vda, which was not restored"]


def test_a_restore_under_the_same_name_keeps_identity_and_points_at_standalone_images():
    images = {"vda": ("/restore/vda.raw", "raw"), "vdb": ("/restore/vdb.raw", "raw")}
    xml, left_out = restored_domain_xml(DOMAIN, "web1", images, None)
    root = ElementTree.fromstring(xml)
    assert root.findtext("uuid") == "6c0bd1a2-6c4e-4b1e-9d5c-1b0f6f0c0001"
    assert root.find("./devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"
    vda = root.find("./devices/disk/target[@dev='vda']/..")
    assert vda.get("type") == "file" and vda.find("backingStore") is None
    assert vda.find("driver").get("type") == "raw" and vda.find("source").get("file") == "/restore/vda.raw"
    assert root.find("./os/nvram").text is None
    assert left_out == ["the UEFI variables, which the backup did not hold"]


def test_damaged_domain_xml_is_refused_clearly():
    with pytest.raises(UserError, match="domain XML cannot be read"):
        restored_domain_xml("<domain>", "x", {}, None)


def test_checkpoint_xml_names_every_disk():
    xml = checkpoint_xml("c2", [qcow2_disk("vda")], [qcow2_disk("vdb")])
    disks = {d.get("name"): d.get("checkpoint") for d in ElementTree.fromstring(xml).findall("./disks/disk")}
    assert disks == {"vda": "bitmap", "vdb": "no"}


def test_backup_xml_exports_our_names_and_leaves_out_the_other_disks(tmp_path):
    vda = qcow2_disk("vda", {"c1": dict(count=65536, granularity=65536, inconsistent=False)})
    request = dict(disks=None, checkpoint="c2", incremental="c1", fallback_to_full=False, scratch_dir=None,
                   scratch_size="10%", nbd_socket=None, cbw_timeout=10, libvirt_small_scratch=False)
    plan = BackupPlan("b7", [vda], request, CheckpointRegistry(str(tmp_path)), "/run/x/nbd.sock")
    plan.disks[0]["scratch"] = "/var/lib/fleetbackup-qemu/ab/b7.scratch"
    root = ElementTree.fromstring(backup_xml(plan, [vda, qcow2_disk("vdb")]))
    assert root.get("mode") == "pull" and root.findtext("incremental") == "c1"
    assert root.find("server").attrib == dict(transport="unix", socket="/run/x/nbd.sock")
    first, second = root.findall("./disks/disk")
    assert first.get("exportname") == "b7/%s/vda" % plan.tag and first.get("exportbitmap") == "fb-b7"
    assert first.get("backupmode") == "incremental" and first.get("incremental") == "c1"
    assert first.find("scratch").get("file") == "/var/lib/fleetbackup-qemu/ab/b7.scratch"
    assert second.attrib == dict(name="vdb", backup="no")
