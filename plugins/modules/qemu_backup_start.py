#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_start
short_description: Freeze a point-in-time view of a running QEMU VM's disks and export it over NBD
version_added: 0.1.0
description:
  - Starts a pull-mode backup of a running QEMU VM over QMP. Every chosen disk gets a point-in-time view
    at one single instant, while the guest keeps running and writing.
  - Each disk's view is exported read-only over NBD on a unix socket, or with O(nbd_tcp) over TCP with TLS for a
    copy on another host (the backup host); copy it with M(fleetbackup.qemu.qemu_backup_copy), then end the backup
    with M(fleetbackup.qemu.qemu_backup_stop).
  - The guest always wins. Data that the guest overwrites during the backup is first kept in a scratch image
    (a copy-before-write filter with C(on-cbw-error=break-snapshot)). When the scratch space runs out, or keeping
    old data takes longer than O(cbw_timeout), the guest's write lands anyway and only the backup's view breaks;
    a copy of a broken view fails, and M(fleetbackup.qemu.qemu_backup_stop) reports RV(fleetbackup.qemu.qemu_backup_stop#module:intact=false).
  - To give all disks one instant, the vCPUs of a running VM are paused while the filters are switched in and the
    checkpoint bitmaps are set (a few milliseconds, returned in RV(backup.pause)). A paused or not yet started VM is
    left as it is. A pause that a killed run left behind is resumed by the next start, stop or info of that VM.
  - With O(checkpoint) it adds a persistent dirty bitmap to every qcow2 disk in the same instant, and with
    O(incremental) it exports only the blocks changed since an earlier checkpoint.
  - One backup per VM runs at a time; a start while another backup of the VM runs fails and names it.
  - A failure at any step removes everything the start had created and names the failed step.
  - Running it again with the same O(backup_id) and options while that backup runs reports no change and returns
    the same result; the same id with other options fails.
  - Checkpoint names must not start with C(fb-), which running backups use for their own bitmaps.
  - With O(domain), the backup goes through libvirt's own API (a pull-mode C(virDomainBackupBegin), its checkpoint
    created in the same call); export names and dirty-bitmap contexts are read back from libvirt, so
    M(fleetbackup.qemu.qemu_backup_copy) works unchanged. libvirt 9.0 fleeces with C(blockdev-backup), where a full
    scratch image fails the guest's writes instead of the backup (a guest that stops on I/O errors pauses). So the
    start makes the scratch images itself, with room reserved for every cluster of their disks, and hands them to
    libvirt; they cannot run out, and the guest still wins. That needs free space of the backed-up disks' virtual
    size (plus qcow2 metadata) in the scratch directory while the backup runs; O(libvirt_small_scratch) reserves only
    O(scratch_size) and accepts the risk. O(cbw_timeout) applies to QMP VMs only. libvirt pauses no vCPU, so
    RV(backup.pause) is null.
  - With O(freeze), the guest agent freezes the guest's file systems around the point in time (C(fsfreeze) flushes
    them and holds new writes), so that the backup is application-consistent; what the guest's applications and
    file systems wrote is complete on the disks, and a restore needs no journal replay. The agent is asked before
    anything is created (O(freeze=always) without an answer fails then, leaving nothing); the freeze comes last,
    just around the vCPU pause, and the thaw follows on every way out, failures included. RV(backup.consistency)
    says what the backup is, RV(backup.freeze.seconds) how long the guest was frozen.
  - The freeze is recorded in fleetbackup's state before it is asked for, and SIGTERM, SIGHUP and SIGINT wait for
    the thaw. A run killed by SIGKILL while the guest was frozen leaves the record, and the next start, stop or info
    of that VM thaws the guest, and only a guest that a dead run of ours froze.
  - A libvirt backup also returns, in RV(backup.libvirt), the domain's definition, the new checkpoint's definition
    and the UEFI variable store (NVRAM), so that the repository keeps what a restore needs besides the disks.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.vm
  - fleetbackup.qemu.vm.backup_id
  - fleetbackup.qemu.start
  - fleetbackup.qemu.tls
seealso:
  - module: fleetbackup.qemu.qemu_backup_copy
  - module: fleetbackup.qemu.qemu_backup_stop
attributes:
  check_mode:
    support: full
    description: Resolves the disks and checkpoints, checks the scratch space and whether the guest agent answers,
      and returns the planned result; creates nothing and freezes nothing.
notes:
  - With O(domain), the socket and the scratch images live in the VM's own directory under O(qemu_dir) unless
    O(nbd_socket) or O(scratch_dir) say otherwise. QEMU's user (C(libvirt-qemu)) must be able to reach a given
    O(scratch_dir), and to create the socket in the directory of a given O(nbd_socket). The stop removes them.
"""

EXAMPLES = r"""
- name: An application-consistent backup, through the guest agent of a VM started with
    -chardev socket,id=qga0,path=/run/vms/web1/qga.sock,server=on,wait=off -device virtio-serial
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    guest_agent_socket: /run/vms/web1/qga.sock
    freeze: always
    backup_id: web1-consistent

- name: Freeze every writable disk of the VM
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-nightly
  register: started

- name: Copy each disk
  fleetbackup.qemu.qemu_backup_copy:
    src: "{{ item.url }}"
    dest: "/backup/web1/{{ item.disk }}.qcow2"
  loop: "{{ started.backup.disks }}"

- name: Start a full backup that opens a checkpoint for the next incremental
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-0001
    checkpoint: c0001
    disks: [vda, vdb]
    scratch_dir: /srv/scratch
    scratch_size: 20G

- name: Export over TCP with TLS, for a copy on the backup host
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-nightly
    nbd_tcp:
      host: 192.0.2.11
      tls_dir: /etc/fleetbackup/tls
      tls_allow: ["O=fleet,OU=client,CN=backup1"]
  register: started

- name: Copy each disk on the backup host, presenting its client certificate
  fleetbackup.qemu.qemu_backup_copy:
    src: "{{ item.url }}"
    tls_certificates: /etc/fleetbackup/tls
    dest: "/backup/web1/{{ item.disk }}.qcow2"
  loop: "{{ started.backup.disks }}"
  delegate_to: backup1

- name: Incremental since c0001, opening c0002
  fleetbackup.qemu.qemu_backup_start:
    qmp_socket: /run/vms/web1/qmp.sock
    backup_id: web1-0002
    incremental: c0001
    checkpoint: c0002
    fallback_to_full: true
"""

RETURN = r"""
backup:
  description: The running backup.
  returned: success
  type: dict
  contains:
    id:
      description: The backup id.
      type: str
      sample: web1-nightly
    nbd_socket:
      description: The NBD server's unix socket; null with O(nbd_tcp).
      type: str
      sample: /var/lib/fleetbackup/vms/qmp-3c1f0a2b9d4e/nbd.sock
    nbd_tcp:
      description: With O(nbd_tcp), where the NBD server listens; else null.
      type: dict
      contains:
        host:
          description: The address.
          type: str
          sample: 192.0.2.11
        port:
          description:
            - The port, also when a free one was taken (in check mode, the one asked for).
            - Null for a stopped VM with several disks, whose disks are served on ports of their own (in their URLs).
          type: int
          sample: 40813
        tls:
          description: Whether the server speaks TLS only (false only with O(nbd_tcp.plain)).
          type: bool
          sample: true
    checkpoint:
      description: The checkpoint created at this backup's point in time, if any.
      type: str
      sample: c0002
    incremental:
      description: The checkpoint this backup is incremental to, if any.
      type: str
      sample: c0001
    pause:
      description:
        - Seconds the vCPUs were paused to give every disk the same instant; null when the VM was not running
          (paused or not yet started), which needs no pause. Null in check mode, and with O(domain).
      type: float
      sample: 0.008
    consistency:
      description:
        - C(application) when the guest agent froze the guest's file systems for the point in time, else C(crash)
          (as after a power cut, file systems replay their journals). In check mode, what the start expects.
      type: str
      sample: application
    freeze:
      description: How the guest's file systems were frozen.
      type: dict
      contains:
        seconds:
          description:
            - How long the guest's file systems were (or, for a freeze that failed, may have been) frozen, from the
              freeze request to the thaw's answer; null when no freeze was asked for. Null in check mode.
          type: float
          sample: 0.043
        filesystems:
          description: How many file systems the agent froze; null when none.
          type: int
          sample: 2
        reason:
          description: Why the backup is crash-consistent, when it is; else null.
          type: str
          sample: no guest_agent_socket was given, the socket of the VM's virtio-serial port org.qemu.guest_agent.0
    libvirt:
      description:
        - With O(domain), what a restore needs besides the disks. Pass it to
          M(fleetbackup.qemu.qemu_backup_repository) (O(fleetbackup.qemu.qemu_backup_repository#module:definition)).
      returned: with O(domain), when the backup started
      type: dict
      contains:
        domain_xml:
          description: The domain's persistent definition (without secrets such as graphics passwords).
          type: str
        checkpoint_xml:
          description: The new checkpoint's definition, to give it back to libvirt if libvirt loses it; else null.
          type: str
        nvram:
          description:
            - The UEFI variable store, C(path), C(sha256) and C(content) (base64), read as the backup started; null
              for a domain without one.
          type: dict
        not_backed_up:
          description: What the backup cannot keep, such as a vTPM's state or disks left out.
          type: list
          elements: str
    disks:
      description: One entry per disk.
      type: list
      elements: dict
      contains:
        disk:
          description: The disk's name (qdev id, else drive id, else node name).
          type: str
          sample: vda
        node:
          description: The disk's block node.
          type: str
          sample: disk0
        export:
          description: The NBD export name, C(<backup id>/<start tag>/<disk>); the copy records it as the image's
            identity.
          type: str
          sample: web1-nightly/5f3a9c01/vda
        url:
          description:
            - NBD URL of the point-in-time view; the O(fleetbackup.qemu.qemu_backup_copy#module:src) to copy.
            - With O(nbd_tcp), C(nbds://HOST:PORT/EXPORT) (C(nbd://) with O(nbd_tcp.plain)). In check mode the port
              is the one asked for (C(0) for a free one), a placeholder.
          type: str
          sample: nbd+unix:///web1-nightly/5f3a9c01/vda?socket=/var/lib/fleetbackup/vms/qmp-3c1f0a2b9d4e/nbd.sock
        size:
          description: Virtual size in bytes.
          type: int
          sample: 10737418240
        mode:
          description: C(full) or C(incremental).
          type: str
          sample: full
        checkpoint:
          description: Whether the disk got the new checkpoint.
          type: bool
          sample: true
        dirty_bitmap:
          description: For an incremental disk, the NBD meta context listing the changed blocks; else null.
          type: str
          sample: "qemu:dirty-bitmap:fb-web1-0002"
        dirty_bytes:
          description: For an incremental disk, the bytes changed since the checkpoint; else null.
          type: int
          sample: 1048576
        reason:
          description: Why a disk asked to be incremental, or to get the checkpoint, did not, with O(fallback_to_full).
          type: str
          sample: checkpoint 'c0001' on disk vda is inconsistent (QEMU stopped uncleanly); it can only be removed
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import (
    BACKUP_ID_ARGUMENT_SPEC,
    START_ARGUMENT_SPEC,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import REQUEST_KEYS, check_request
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.module import VmModule


def main():
    module = VmModule(
        argument_spec=dict(BACKUP_ID_ARGUMENT_SPEC, **START_ARGUMENT_SPEC),
        mutually_exclusive=[("domain", "guest_agent_socket"), ("nbd_socket", "nbd_tcp")],
        supports_check_mode=True,
    )
    module.run(start)


def start(module):
    params = module.params
    request = {key: params[key] for key in REQUEST_KEYS}
    check_request(request)
    with module.vm() as vm:
        changed, backup = VmBackups(vm).start(params["backup_id"], request, module.check_mode)
    module.warn_all(vm.notes)
    return dict(changed=changed, backup=backup)


if __name__ == "__main__":
    main()
