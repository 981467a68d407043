# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  qmp_socket:
    description:
      - Path of the VM's QMP unix socket (C(-qmp unix:PATH,server=on,wait=off)), for a VM that libvirt does not
        manage.
      - A QMP monitor serves one client at a time, so give a VM meant for fleetbackup a C(-qmp) socket of its own;
        QEMU accepts several.
      - Exactly one of O(qmp_socket) and O(domain) names the VM.
    type: path
  domain:
    description:
      - Name or UUID of a libvirt domain, reached through libvirt's own backup and checkpoint APIs at O(libvirt_uri).
        Never through its monitor, so the domain is not tainted.
      - Exactly one of O(qmp_socket) and O(domain) names the VM.
    type: str
  libvirt_uri:
    description:
      - libvirt's connection URI, like community.libvirt's C(uri) option (also accepted as O(uri)); used with O(domain).
      - The module runs on the hypervisor, so a local URI; C(?socket=PATH) reaches a libvirtd on another socket.
    type: str
    default: qemu:///system
    aliases: [uri]
  qemu_dir:
    description:
      - With O(domain), the directory for the backup's scratch images and NBD socket, which QEMU (running as its own
        user, such as C(libvirt-qemu)) must reach. It and each VM's directory in it (C(lv-<uuid>)) are root's, mode
        0711, so QEMU can pass through but nobody can list them. Each start makes a directory of its own there for
        the socket, which QEMU's user can write only until QEMU made the socket; then the socket and the directory
        become root's alone.
    type: path
    default: /var/lib/fleetbackup-qemu
  timeout:
    description:
      - Seconds to wait for QEMU's greeting, for each QMP command and awaited event, and for a libvirt backup job to
        end after it was aborted.
      - A QMP monitor busy with another client sends no greeting; the module then fails instead of hanging.
    type: float
    default: 10
    aliases: [qmp_timeout]
  state_dir:
    description:
      - fleetbackup's own directory on the hypervisor, created with mode 0700 if missing. It must belong to the
        user the module runs as (root), and nobody else may write to it.
      - It holds the state of running backups (C(vms/)), the checkpoint registry (C(checkpoints/)), which records
        each checkpoint's disk size so that an incremental after a resize is refused, and, by default, the NBD
        sockets and the scratch images.
      - Every module must be given the same one for a VM.
    type: path
    default: /var/lib/fleetbackup
requirements:
  - With O(qmp_socket), qemu.qmp (Python package) and QEMU 7.1 or newer
  - With O(domain), libvirt 9.0 or newer and its Python bindings (Debian package python3-libvirt)
notes:
  - Run the module on the hypervisor that runs the VM; the sockets are local.
  - This module belongs to the C(fleetbackup.qemu.vm) action group, so C(module_defaults) can set
    O(qmp_socket) or O(domain), and O(state_dir), once for a play.
"""

    BACKUP_ID = r"""
options:
  backup_id:
    description:
      - Name of the backup. Every QEMU object that the backup creates is named from it, which is how
        M(fleetbackup.qemu.qemu_backup_stop) finds them again with nothing but this id and the VM.
      - Letters, digits, C(_) and C(-); at most 32 characters.
    type: str
    required: true
"""

    COPY_PROGRESS = r"""
options:
  state_dir:
    description:
      - fleetbackup's own directory on the host that copies, which a copy creates with mode 0700 if missing; it
        must belong to the user the module runs as, and nobody else may write to it. The same directory as the VM
        modules' when the copy runs on the hypervisor.
      - The progress of each copy is kept in C(copies/), in a record named after the SHA-256 of O(dest)'s absolute
        path. A record stays for a day after its copy ended.
    type: path
    default: /var/lib/fleetbackup
"""
