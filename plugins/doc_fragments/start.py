# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options that define a backup (their spec: START_ARGUMENT_SPEC in module_utils/_base/options.py), with
    # fleetbackup.qemu.tls for O(nbd_tcp).
    DOCUMENTATION = r"""
options:
  disks:
    description:
      - The disks to back up, each a qdev id (C(vda)), a qdev path, a drive id or a block node name.
      - By default every writable disk that has a medium.
    type: list
    elements: str
  scratch_dir:
    description:
      - Directory for the scratch images that keep the point-in-time view while the guest writes. They have no name
        (they are opened and handed to QEMU as file descriptors), so nothing of them can be seen, planted or left
        behind there, and QEMU may run as any user.
      - Defaults to C(<state_dir>/scratch). A directory that other users can write into is refused unless it is
        sticky, like C(/var/tmp).
      - With O(domain), libvirt opens scratch images by name, so they are named after the backup; the default is the
        VM's directory under O(qemu_dir).
    type: path
  scratch_size:
    description:
      - Room reserved in O(scratch_dir) for this backup's scratch images, as a size (C(512M), C(2G)) or a
        percentage of the total virtual size of the disks being backed up; shared among the disks by their size.
      - The start reserves it (fallocate) before anything else, and fails clearly when O(scratch_dir) lacks it.
        The scratch images never grow beyond it, so the backup never takes space from the VMs, even when their
        disks share the file system of O(scratch_dir).
      - The scratch space holds the old data of what the guest overwrites until the backup stops. A guest that
        overwrites more breaks the backup, never its own writes.
      - The default, 10% of the disks' size, covers a busy VM rewriting a tenth of its disks during one backup;
        raise it for write-heavy VMs and long copies.
      - With O(domain), the room reserved is the disks' whole size instead, unless O(libvirt_small_scratch).
    type: str
    default: 10%
  cbw_timeout:
    description:
      - Seconds a guest write may wait while QEMU keeps the old data it overwrites, 1 to 60. After that the write
        goes ahead and the backup's view breaks instead.
      - The default of 10 s stays well below the guest's own disk timeouts (30 s for Linux SCSI disks, 60 s on
        Windows), so a stalled scratch disk never makes a guest reset its disk, while a short stall of the scratch
        storage does not break the backup.
    type: int
    default: 10
  nbd_socket:
    description:
      - Path of the unix socket that QEMU's NBD server listens on for this backup. The module creates it, mode
        0600, and hands it to QEMU already listening.
      - Defaults to C(nbd.sock) in the VM's directory under O(state_dir), or under O(qemu_dir) with O(domain), where
        QEMU creates it and the module makes it 0600.
      - Its directory must not be writable by other users unless it is sticky.
      - Not with O(nbd_tcp).
    type: path
  checkpoint:
    description:
      - Name of a new checkpoint (a persistent dirty bitmap) added to every backed-up disk at the backup's
        point in time. A later O(incremental) backup since it reads only what changed after this backup.
      - Needs qcow2 disks. It must not exist yet on any of them. With O(fallback_to_full), disks of other
        formats are backed up in full without it, and RV(backup.disks[].reason) says so.
      - The checkpoint exists from the start on; if the copy fails, stop with
        O(fleetbackup.qemu.qemu_backup_stop#module:discard_checkpoint=true).
    type: str
  incremental:
    description:
      - Name of an existing checkpoint. Each disk exports only the blocks written since it, as the
        NBD meta context in the disk's RV(backup.disks[].dirty_bitmap).
      - Checkpoints keep recording, so naming an older checkpoint gives a differential backup.
    type: str
  fallback_to_full:
    description:
      - Where O(incremental) or O(checkpoint) cannot be used on a disk (the checkpoint is missing, inconsistent after
        QEMU died, the disk was resized since it, or the disk is not qcow2), back that disk up in full and say why in
        RV(backup.disks[].reason).
      - Without it such a disk fails the start before anything is created.
    type: bool
    default: false
  freeze:
    description:
      - Whether the guest agent (qemu-guest-agent in the guest) freezes the guest's file systems for the backup's
        point in time.
      - C(auto) freezes when the agent answers (within O(freeze_timeout)), and otherwise takes a crash-consistent
        backup and says why in RV(backup.freeze.reason). C(always) fails when the guest cannot be frozen, before
        anything is created, or, if the freeze itself fails, after removing all it created. C(never) does not ask.
      - With O(qmp_socket), the agent is reached on O(guest_agent_socket); without it, C(auto) takes a
        crash-consistent backup. A VM that is not running is never frozen (its agent cannot answer, and its file
        systems cannot change).
      - With O(domain), libvirt freezes and thaws (C(virDomainFSFreeze), C(virDomainFSThaw)) through the domain's
        agent channel (a C(<channel type='unix'>) whose virtio target is named C(org.qemu.guest_agent.0)); the
        live XML tells whether the guest has connected to it, without any agent command. libvirt bounds its wait for
        the agent itself (C(virsh guest-agent-timeout)).
    type: str
    choices: [auto, always, never]
    default: auto
  guest_agent_socket:
    description:
      - With O(qmp_socket), the host's unix socket of the VM's guest agent channel, the C(-chardev socket) behind its
        virtio-serial port named C(org.qemu.guest_agent.0), such as
        C(-chardev socket,id=qga0,path=/run/vms/web1/qga.sock,server=on,wait=off -device virtio-serial
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0).
      - The socket serves one client at a time; the module holds it from its check until the thaw. Its directory
        must not be writable by other users unless it is sticky.
      - Not with O(domain); libvirt reaches its domains' agents itself.
    type: path
  freeze_timeout:
    description:
      - Seconds to wait for each answer of the guest agent (the check that it answers, the freeze, the thaw), more
        than 0 and at most 60. The freeze answers once the guest has flushed its file systems.
      - A freeze that does not answer in time is thawed; C(auto) then goes on crash-consistent.
    type: float
    default: 10
  libvirt_small_scratch:
    description:
      - With O(domain), reserve only O(scratch_size) for the scratch images instead of the backed-up disks' whole
        size. Beyond the reserved room they grow into the file system's free space; when that runs out, the
        guest's writes fail until the backup stops.
    type: bool
    default: false
"""
