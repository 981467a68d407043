"""The XML that the libvirt connection writes and rewrites: backups, checkpoints, restored domains."""

from xml.etree import ElementTree

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import BackupPlan
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import CheckpointRegistry
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.definition import (
    restore_identity,
    restored_domain_xml,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.libvirt_pull import backup_xml
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.checkpoints import checkpoint_xml
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.disks import Disk

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


IDENTITY = dict(repository="/backup", vm="web1", backup="20261129T020000Z-3f2a", dest="/restore")


def disk_sources(xml):
    return {disk.find("target").get("dev"): disk.find("source").get("file")
            for disk in ElementTree.fromstring(xml).findall("./devices/disk")}


def test_a_firmware_efi_domain_gets_its_restored_variables():
    efi = """<domain type='kvm'><name>w</name><os firmware='efi'><type>hvm</type></os><devices/></domain>"""
    xml, left_out = restored_domain_xml(efi, "w", {}, "/restore/nvram.fd", IDENTITY)
    assert ElementTree.fromstring(xml).findtext("./os/nvram") == "/restore/nvram.fd" and left_out == []
    _xml, left_out = restored_domain_xml(efi, "w", {}, None, IDENTITY)
    assert left_out == ["the UEFI variables, which the backup did not hold"]


def test_a_definition_from_a_repository_touches_nothing_of_the_host():
    hostile = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <name>w</name>
      <os><type>hvm</type><loader type='rom'>/tmp/evil.bin</loader><kernel>/boot/vmlinuz</kernel></os>
      <devices>
        <emulator>/tmp/evil</emulator>
        <disk type='file' device='disk'><driver type='qcow2'/><source file='/etc/shadow'/>
          <encryption format='luks'/><target dev='vda'/></disk>
        <disk type='block' device='lun'><source dev='/dev/sda'/><target dev='sdb'/></disk>
        <hostdev mode='subsystem' type='pci'/>
        <filesystem><source dir='/'/><target dir='root'/></filesystem>
        <interface type='ethernet'><script path='/tmp/evil.sh'/></interface>
        <interface type='network'><source network='default'/></interface>
        <serial type='file'><source path='/etc/passwd'/></serial>
        <channel type='unix'><source mode='bind' path='/etc/x'/><target type='virtio' name='org.qemu.guest_agent.0'/>
        </channel>
        <rng model='virtio'><backend model='random'>/dev/sda</backend></rng>
      </devices>
      <seclabel type='none'/>
      <qemu:commandline><qemu:arg value='-evil'/></qemu:commandline>
    </domain>"""
    xml, left_out = restored_domain_xml(hostile, "w", {"vda": ("/restore/vda.qcow2", "qcow2")}, None, IDENTITY)
    root = ElementTree.fromstring(xml)
    assert [local(e.tag) for e in root] == ["name", "os", "devices", "metadata"]
    assert [e.tag for e in root.find("os")] == ["type"]
    assert [d.tag for d in root.find("devices")] == ["disk", "interface", "channel"]
    vda = root.find("./devices/disk")
    assert vda.find("source").get("file") == "/restore/vda.qcow2" and vda.find("encryption") is None
    assert root.find("./devices/interface").get("type") == "network"
    assert root.find("./devices/channel/source") is None
    assert len(left_out) == 11, left_out


def local(tag):
    return tag.rsplit("}", 1)[-1]


def qcow2_disk(name, bitmaps=None):
    return Disk(name=name, node=name, root=name, drive=name, qdev="ua-" + name, format="qcow2",
                filename="/srv/%s.qcow2" % name, size=1 << 30, read_only=False, bitmaps=bitmaps or {})


def test_a_restored_copy_under_a_new_name_gets_new_identity_and_only_restored_disks():
    xml, left_out = restored_domain_xml(DOMAIN, "web1-drill", {"vdb": ("/restore/vdb.qcow2", "qcow2")},
                                        "/restore/nvram.fd", IDENTITY)
    root = ElementTree.fromstring(xml)
    assert root.findtext("name") == "web1-drill"
    assert root.find("uuid") is None and root.find("./devices/interface/mac") is None
    assert disk_sources(xml) == {"vdb": "/restore/vdb.qcow2"}
    assert root.findtext("./os/nvram") == "/restore/nvram.fd"
    assert left_out == ["disk vda, which was not restored", "the cdrom sda, which holds no backed-up disk"]
    assert restore_identity(xml) == IDENTITY


def test_a_restore_under_the_same_name_keeps_identity_and_points_at_standalone_images():
    images = {"vda": ("/restore/vda.raw", "raw"), "vdb": ("/restore/vdb.raw", "raw")}
    xml, left_out = restored_domain_xml(DOMAIN, "web1", images, None, IDENTITY)
    root = ElementTree.fromstring(xml)
    assert root.findtext("uuid") == "6c0bd1a2-6c4e-4b1e-9d5c-1b0f6f0c0001"
    assert root.find("./devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"
    vda = root.find("./devices/disk/target[@dev='vda']/..")
    assert vda.get("type") == "file" and vda.find("backingStore") is None
    assert vda.find("driver").get("type") == "raw" and vda.find("source").get("file") == "/restore/vda.raw"
    assert root.find("./os/nvram").text is None
    assert left_out == ["the UEFI variables, which the backup did not hold",
                        "the cdrom sda, which holds no backed-up disk"]


def test_damaged_domain_xml_is_refused_clearly():
    with pytest.raises(UserError, match="domain XML cannot be read"):
        restored_domain_xml("<domain>", "x", {}, None, IDENTITY)


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
