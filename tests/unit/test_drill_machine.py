"""The drill's machine: what a libvirt domain's XML says, and the isolated QEMU command line made of it."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill import Drill
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill_machine import (
    OVMF_CODE,
    DrillDisk,
    DrillMachine,
)

UEFI_DOMAIN = """<domain type='kvm'>
  <name>web1</name>
  <memory unit='KiB'>2097152</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'><source file='/v/sys.qcow2'/><target dev='sda' bus='sata'/></disk>
    <disk type='file' device='cdrom'><target dev='sdc' bus='sata'/></disk>
    <disk type='file' device='disk'><source file='/v/data.qcow2'/><target dev='sdb' bus='scsi'/></disk>
    <disk type='file' device='disk'><source file='/v/logs.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <interface type='network'><mac address='52:54:00:00:00:01'/></interface>
  </devices>
</domain>"""


def test_a_domain_xml_gives_the_machine_firmware_memory_and_buses():
    machine = DrillMachine.from_domain_xml(UEFI_DOMAIN)
    assert (machine.machine, machine.loader, machine.secure, machine.memory_mib) == (
        "pc-q35-7.2", "/usr/share/OVMF/OVMF_CODE_4M.ms.fd", True, 2048)
    assert machine.buses == dict(sda="sata", sdb="scsi", vda="virtio")
    auto = DrillMachine.from_domain_xml("<domain><os firmware='efi'><type>hvm</type></os><devices/></domain>")
    assert (auto.machine, auto.loader, auto.secure) == ("q35", OVMF_CODE, False)
    with pytest.raises(UserError, match="drills boot SeaBIOS or a UEFI pflash only"):
        DrillMachine.from_domain_xml("<domain><os><loader type='rom'>/x.bin</loader></os><devices/></domain>")
    for hostile, message in (("<type machine='q35,kernel=/etc/shadow'>hvm</type>", "drills boot pc and q35"),
                             ("<loader type='pflash'>/var/lib/vms/db1/vda.qcow2</loader>", "host's own firmware"),
                             ("<loader type='pflash'>/usr/share/OVMF/../../../etc/shadow</loader>", "host's own")):
        with pytest.raises(UserError, match=message):
            DrillMachine.from_domain_xml("<domain><os>%s</os><devices/></domain>" % hostile)
    with pytest.raises(UserError, match="cannot be read"):
        DrillMachine.from_domain_xml("<domain>")


def test_the_command_line_is_isolated_and_boots_the_overlays_on_their_buses(tmp_path):
    machine = DrillMachine.from_domain_xml(UEFI_DOMAIN)
    disks = [DrillDisk(name, "/r/%s.qcow2" % name, machine.buses[name]) for name in ("sda", "sdb", "vda")]
    args = Drill(str(tmp_path), disks, machine, "tcg", None, 2, nvram=b"vars").command_line(7)
    line = " ".join(args)
    for isolated in ("-nodefaults", "-no-user-config", "-nic none", "-no-reboot", "-display none",
                     "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"):
        assert isolated in line
    assert "-machine pc-q35-7.2,accel=tcg,smm=on" in line and "-m 2048 -smp 2" in line
    assert "driver=cfi.pflash01,property=secure,value=on" in line
    assert "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.ms.fd" in line
    assert "if=pflash,format=raw,file=%s/nvram.fd" % tmp_path in line
    assert "socket,id=agent,fd=7,server=on,wait=off" in line
    devices = [args[i + 1] for i, arg in enumerate(args) if arg == "-device"]
    assert devices == ["virtio-serial-pci", "virtserialport,chardev=agent,name=org.qemu.guest_agent.0",
                       "ide-hd,drive=disk0,bus=ide.0,bootindex=0", "virtio-scsi-pci,id=scsi0",
                       "scsi-hd,drive=disk1,bus=scsi0.0,scsi-id=0,bootindex=1", "virtio-blk-pci,drive=disk2,bootindex=2"]
    # The overlays are the drill's own files; the images beneath them appear nowhere on the command line.
    assert "/r/" not in line and "filename=%s/disk0.qcow2" % tmp_path in line
    with pytest.raises(UserError, match="on a usb bus, which drills do not emulate"):
        Drill(str(tmp_path), [DrillDisk("sdz", "/r/z", "usb")], DrillMachine(), "tcg", 256, 1).command_line(7)


def test_a_uefi_backup_without_its_variables_boots_on_a_copy_of_the_hosts_empty_store(tmp_path):
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill_machine import OVMF_VARS

    drill = Drill(str(tmp_path), [], DrillMachine(loader=OVMF_CODE, secure=True), "tcg", 256, 1)
    drill.prepare()
    with open(OVMF_VARS[True], "rb") as template:
        assert (tmp_path / "nvram.fd").read_bytes() == template.read()
    assert "if=pflash,format=raw,file=%s/nvram.fd" % tmp_path in " ".join(drill.command_line(7))
