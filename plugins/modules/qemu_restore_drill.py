#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_restore_drill
short_description: Boot a VM's backup in an isolated QEMU and check that its guest comes up sound
version_added: 0.1.0
description:
  - A restore drill. It takes a recorded backup of a VM (the newest by default) and boots its disks, as a restore
    would give them back, through the firmware and the guest's own bootloader, in a QEMU of its own. Then it waits
    for the guest agent, checks the guest's file systems through it, runs an optional command in the guest, and
    reports whether the drill passed, how long the boot took and, when it failed, why.
  - The disks boot from the repository, each the top of its backup chain (the images the restore flattens), or from
    images restored from that backup (O(images)). Either way the drill writes only to throwaway qcow2 overlays of its
    own; QEMU opens the images beneath them read-only, so the repository and the restored images are never written.
  - The drill's QEMU is isolated. It has no network device, no display and no USB, runs under seccomp
    (C(-sandbox on) with every option denied) and does not reboot (a guest that reboots or halts ends the drill).
    The guest agent, on the virtio-serial port C(org.qemu.guest_agent.0), is its only way out, on a socket the module
    listens on itself. Its console goes to a log whose last lines a failed drill returns.
  - For a backup of a libvirt domain, the machine type, the UEFI firmware (with a copy of the backup's UEFI
    variables, checked against their checksum), the memory and each disk's bus (virtio, sata, ide, scsi) come from
    the domain's XML kept with the backup. Otherwise the drill boots a q35 machine with SeaBIOS and virtio disks.
  - The checks. The agent must answer within O(boot_timeout). With O(check_filesystems), the agent lists the guest's
    file systems mounted from disks (C(guest-get-fsinfo)), there must be at least one, and the kernel log (C(dmesg),
    where the guest runs it) must hold no file system or disk error, such as a file system remounted read-only.
    O(command) then runs through C(guest-exec) and must exit 0.
  - It leaves nothing behind. QEMU is killed by its PID when the drill ends, pass or fail, and dies with the
    module's process if that is killed (C(PR_SET_PDEATHSIG)). The overlays, sockets and logs live in a directory of
    the drill's own under O(state_dir)C(/drills), removed at the end; one that a killed drill left is removed by the
    next drill.
  - A drill that does not pass fails the task, with RV(drill) saying why. It never changes anything that outlives
    it, so it reports no change.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.repository
  - fleetbackup.qemu.repository.link
  - fleetbackup.qemu.encryption
options:
  backup:
    description: Name of the backup to drill, as in the manifest; the newest complete backup by default.
    type: str
  images:
    description:
      - Images restored from the backup, by disk name (RV(fleetbackup.qemu.qemu_backup_restore#module:disks)), to boot
        instead of the repository's chains. Disks not named here boot from the repository.
    type: dict
  state_dir:
    description: fleetbackup's private directory (mode 0700), where each drill makes a directory of its own.
    type: path
    default: /var/lib/fleetbackup
  accel:
    description:
      - QEMU's accelerators, in order of preference, as for C(-machine accel=). C(tcg) emulates the CPU, slowly, where
        KVM is missing or cannot boot guests (nested virtualisation).
    type: str
    default: kvm:tcg
  memory:
    description: The guest's memory in MiB; by default the domain XML's, else 1024.
    type: int
  cpus:
    description: The guest's vCPUs.
    type: int
    default: 1
  boot_timeout:
    description: Seconds from QEMU's start until the guest agent must answer.
    type: float
    default: 300
  console_silence_timeout:
    description:
      - Seconds that a booting guest may write nothing more on its serial console, once it wrote there, before its
        agent answers. A guest stuck in its bootloader, firmware or kernel then fails at once, saying so, instead of
        after O(boot_timeout).
      - A guest that never writes on its serial console is not judged by it. V(0) turns the check off.
    type: float
    default: 120
  check_filesystems:
    description: Check the guest's file systems through its agent, as described above.
    type: bool
    default: true
  command:
    description:
      - A command to run in the guest once it is up, as a list (the program, looked up in the agent's C(PATH), then its
        arguments). The drill passes only if it exits 0. Its exit status and output are returned.
    type: list
    elements: str
  command_timeout:
    description: Seconds that O(command) may run.
    type: float
    default: 300
requirements:
  - qemu-system-x86_64 (Debian package qemu-system-x86) and qemu-img (qemu-utils) on the host that runs the drill
  - For UEFI guests, their firmware (C(OVMF_CODE_4M.fd) of Debian's ovmf, or the path the domain XML names)
  - A guest that runs qemu-guest-agent
seealso:
  - module: fleetbackup.qemu.qemu_backup_restore
attributes:
  check_mode:
    support: full
    description: Checks the backup, its chains, images and definition, and returns what would be booted; boots nothing.
notes:
  - Give O(accel=tcg) on hosts whose KVM cannot boot guests; a drill under TCG is slower but checks the same things.
"""

EXAMPLES = r"""
- name: Boot web1's newest backup and check it
  fleetbackup.qemu.qemu_restore_drill:
    repository: /backup
    vm: web1
  register: drill

- name: Boot a given backup and check the application's data in it
  fleetbackup.qemu.qemu_restore_drill:
    repository: /backup
    vm: db1
    backup: 20261129T020000Z-3f2a
    command: [/usr/local/bin/check-database, --read-only]
    boot_timeout: 600

- name: Boot the images a restore wrote
  fleetbackup.qemu.qemu_restore_drill:
    repository: /backup
    vm: web1
    images:
      vda: /var/lib/vms/web1-restored/vda.qcow2
"""

RETURN = r"""
drill:
  description: The drill, also when it failed.
  returned: always, unless the backup could not be found or read
  type: dict
  contains:
    vm:
      description: The VM.
      type: str
      sample: web1
    backup:
      description: The backup drilled.
      type: str
      sample: 20261129T020000Z-3f2a
    directory:
      description: The VM's directory in the repository, where it really is (after a link it was let to follow).
      type: str
      sample: /backup/web1
    passed:
      description: Whether the guest booted and every check passed; null in check mode.
      type: bool
      sample: true
    problems:
      description: Why the drill failed; empty when it passed.
      type: list
      elements: str
      sample: ["no guest agent answered within 300 s of the start: the guest did not boot, ..."]
    boot_seconds:
      description: Seconds from QEMU's start until the guest agent answered; null when it did not.
      type: float
      sample: 2.71
    seconds:
      description: Seconds the whole drill took, from QEMU's start until it was gone.
      type: float
      sample: 3.9
    disks:
      description: What was booted, in boot order, each C(disk), C(image) (beneath the throwaway overlay) and C(bus).
      type: list
      elements: dict
    machine:
      description: The machine type booted.
      type: str
      sample: q35
    firmware:
      description: The UEFI firmware booted, or C(bios) (SeaBIOS).
      type: str
      sample: bios
    filesystems:
      description: The guest's file systems mounted from disks, each C(mountpoint), C(type) and C(device).
      type: list
      elements: dict
      sample: [{"mountpoint": "/", "type": "ext4", "device": "vda1"}]
    command:
      description: With O(command), its C(argv), C(exitcode), C(signal), C(stdout) and C(stderr) (their last 4 KiB).
      type: dict
    console:
      description: The last lines of the guest's serial console, when the drill failed.
      type: list
      elements: str
"""

import os
import shutil

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import encryption_from, needs_secret
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import (
    ENCRYPTION_ARGUMENT_SPEC,
    REPOSITORY_ARGUMENT_SPEC,
    STATE_DIR,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    QemuImgError,
    SecretError,
    chain_is_encrypted,
    check_image,
    image_info,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill import Drill, drill_directory
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill_machine import DrillDisk, DrillMachine


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            **REPOSITORY_ARGUMENT_SPEC,
            backup=dict(type="str"),
            images=dict(type="dict"),
            state_dir=STATE_DIR,
            accel=dict(type="str", default="kvm:tcg"),
            memory=dict(type="int"),
            cpus=dict(type="int", default=1),
            boot_timeout=dict(type="float", default=300),
            console_silence_timeout=dict(type="float", default=120),
            check_filesystems=dict(type="bool", default=True),
            command=dict(type="list", elements="str"),
            command_timeout=dict(type="float", default=300),
            **ENCRYPTION_ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    module.run(drill)


def drill(module):
    params = module.params
    check_numbers(params)
    repository = Repository(params["repository"], params["vm"], params["follow_repository_link"])
    data = repository.load_existing()
    backup = repository.find(data, params["backup"])
    definition = backup.get("definition")
    machine = DrillMachine.from_domain_xml(repository.read_file(definition["domain_xml"]).decode()) \
        if definition else DrillMachine()
    if machine.loader and not os.path.isfile(machine.loader):
        raise UserError("The UEFI firmware %s that backup %s boots is not on this host: install it (Debian: apt install "
                        "ovmf), or drill on a host that has it." % (machine.loader, backup["name"]))
    nvram = repository.nvram(definition)
    disks = [DrillDisk(disk["disk"], chosen_image(repository, data, backup, disk, params["images"] or {}),
                       machine.buses.get(disk["disk"], "virtio")) for disk in backup["disks"]]
    encryption = encryption_from(params["encryption"])
    encrypted = [disk for disk in disks if chain_is_encrypted(disk.image)]
    for disk in encrypted:
        needs_secret(disk.image, True, encryption)
        try:
            check_image(disk.image, encryption)  # a wrong secret fails here, before anything boots
        except SecretError as err:
            raise err.of(disk.image) from None
    unknown = sorted(set(params["images"] or {}) - {disk.name for disk in disks})
    if unknown:
        raise UserError("Backup %s has no disk %s; it has %s."
                        % (backup["name"], ", ".join(unknown), ", ".join(disk.name for disk in disks)))
    report = dict(vm=params["vm"], backup=backup["name"], directory=repository.path, machine=machine.machine,
                  firmware=machine.loader or "bios",
                  disks=[dict(disk=disk.name, image=disk.image, bus=disk.bus) for disk in disks])
    if module.check_mode:
        return dict(changed=False, drill=dict(report, passed=None, problems=[], boot_seconds=None, seconds=None,
                                              filesystems=[], command=None, console=[]))
    workdir = drill_directory(params["state_dir"])
    try:
        run = Drill(workdir, disks, machine, params["accel"], params["memory"], params["cpus"], nvram,
                    encryption if encrypted else None)
        run.prepare()
        report.update(run.run(params["boot_timeout"], params["check_filesystems"], params["command"],
                              params["command_timeout"], params["console_silence_timeout"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not report["passed"]:
        console = ("the console's last lines: %s" % " | ".join(report["console"][-3:]) if report["console"]
                   else "the guest wrote nothing on its serial console")
        module.fail_json(msg="Restore drill of %s, backup %s, failed: %s; %s." % (
            params["vm"], backup["name"], "; ".join(report["problems"]), console), changed=False, drill=report)
    return dict(changed=False, drill=report)


def check_numbers(params):
    for name, low in (("boot_timeout", 1), ("console_silence_timeout", 0), ("command_timeout", 1), ("cpus", 1),
                      ("memory", 16)):
        if params[name] is not None and params[name] < low:
            raise UserError("%s must be at least %d." % (name, low))


def chosen_image(repository, data, backup, disk, images):
    """The image a disk boots from: the one given in images, else the top of its chain in the repository."""
    if disk["disk"] not in images:
        repository.check_chain(data, backup, disk)
        return repository.image(disk["file"])
    path = images[disk["disk"]]
    try:
        image_info(path)
    except QemuImgError as err:
        raise UserError("The image %s given for disk %s cannot be read: %s" % (path, disk["disk"], err)) from None
    return path


if __name__ == "__main__":
    main()
