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
  nbd_tcp:
    description:
      - Serve the exports over TCP instead of the unix socket, so that M(fleetbackup.qemu.qemu_backup_copy) can read
        them from another host, such as the backup host that holds the repository.
      - QEMU's NBD server then speaks TLS only, with the x509 certificates in O(nbd_tcp.tls_dir). It checks every
        client's certificate against the CA (C(verify-peer)), and admits only those whose distinguished name is in
        O(nbd_tcp.tls_allow) (a C(tls-authz) filter); clients without a certificate, with one of another CA or with
        another name are refused before they see any export.
      - The module binds and listens on the address itself and hands QEMU the listening socket, as it does with the
        unix socket, so QEMU binds nothing and a free port (O(nbd_tcp.port=0)) is known before the URLs are
        returned. The listener, the credentials and the filter exist only until M(fleetbackup.qemu.qemu_backup_stop).
      - QEMU reads the credentials as the user it runs as (C(-runas)). The module copies them, as it checked them,
        into its private state directory for QEMU's user alone and hands QEMU a descriptor of that directory; the
        copies are removed as soon as QEMU has loaded them.
      - The URLs in RV(backup.disks[].url) are C(nbds://HOST:PORT/EXPORT); the copy adds its client certificates
        with O(fleetbackup.qemu.qemu_backup_copy#module:tls_certificates).
      - A stopped VM's disks are each served by a qemu-nbd of their own, with the same TLS checks. The module hands
        each a listener of its own (socket activation), so with several disks O(nbd_tcp.port) must be C(0), each
        disk's port is in its URL, and RV(backup.nbd_tcp.port) is null.
      - Not for running libvirt domains (O(domain)), since libvirt's backup server would admit every certificate of
        the CA and takes its certificates from C(qemu.conf) for the whole host. Such a start fails. A shut-off domain
        is served by qemu-nbd like any stopped VM, and may use it.
      - M(fleetbackup.qemu.qemu_backup_stop), which has no certificate that QEMU admits, ends the TCP server first and
        reads the backup's probes on a unix socket of its own, to report
        RV(fleetbackup.qemu.qemu_backup_stop#module:intact).
    type: dict
    suboptions:
      host:
        description:
          - The IP address of this hypervisor to listen on, one that the backup host reaches; it goes into the URLs.
          - The server certificate must name it as an IP SAN, since the copy checks the server's name.
          - A wildcard address (C(0.0.0.0), C(::)) is refused.
        type: str
        required: true
      port:
        description:
          - TCP port to listen on; C(0) takes a free port, returned in RV(backup.nbd_tcp.port) and the URLs.
          - Each running backup needs a port of its own.
        type: int
        default: 0
      tls_dir:
        description:
          - Directory on the hypervisor with the fleet CA's C(ca-cert.pem) and this hypervisor's C(server-cert.pem)
            and C(server-key.pem), as the C(fleetbackup.qemu.fleet_ca) playbook makes them.
          - The directory and files must belong to root and be writable by nobody else; the key must be readable by
            root alone (0600). Links are refused.
          - Required unless O(nbd_tcp.plain).
        type: path
      tls_allow:
        description:
          - The distinguished names of the client certificates that may read the exports, as QEMU prints them, in
            the order of the certificate's subject, like C(O=fleet,OU=client,CN=backup1). Usually the backup host's
            alone.
          - Required with O(nbd_tcp.tls_dir).
        type: list
        elements: str
      plain:
        description:
          - Serve plain NBD over TCP, without TLS. Anyone who reaches the address could read the disks, so it is
            refused unless O(nbd_tcp.host) is a loopback address, and even there every local user (and every
            container in the host's network namespace) can read them while the backup runs. For tests and
            benchmarks; use TLS, or the unix socket (root's alone), for real backups.
        type: bool
        default: false
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

from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import REQUEST_KEYS, check_request
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_freeze import FREEZE_MODES
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.module import BACKUP_ID_ARGUMENT_SPEC, VmModule


def main():
    module = VmModule(
        argument_spec=dict(
            BACKUP_ID_ARGUMENT_SPEC,
            disks=dict(type="list", elements="str"),
            scratch_dir=dict(type="path"),
            scratch_size=dict(type="str", default="10%"),
            cbw_timeout=dict(type="int", default=10),
            nbd_socket=dict(type="path"),
            nbd_tcp=dict(type="dict", options=dict(
                host=dict(type="str", required=True),
                port=dict(type="int", default=0),
                tls_dir=dict(type="path"),
                tls_allow=dict(type="list", elements="str"),
                plain=dict(type="bool", default=False),
            )),
            checkpoint=dict(type="str"),
            incremental=dict(type="str"),
            fallback_to_full=dict(type="bool", default=False),
            libvirt_small_scratch=dict(type="bool", default=False),
            freeze=dict(type="str", choices=list(FREEZE_MODES), default="auto"),
            guest_agent_socket=dict(type="path"),
            freeze_timeout=dict(type="float", default=10),
        ),
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
