# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  qmp_socket:
    description:
      - Path of the VM's QMP unix socket (C(-qmp unix:PATH,server=on,wait=off)).
      - A QMP monitor serves one client at a time. libvirt holds the monitors of its VMs, so give
        a VM meant for fleetbackup a C(-qmp) socket of its own; QEMU accepts several.
    type: path
    required: true
  qmp_timeout:
    description:
      - Seconds to wait for QEMU's greeting, for each command and for each awaited event.
      - A monitor busy with another client sends no greeting; the module then fails instead of hanging.
    type: float
    default: 10
  checkpoint_dir:
    description:
      - Directory of the checkpoint registry, which records each checkpoint's disk size and creation time (QEMU's
        bitmaps do not), so that an incremental after a disk resize is refused or falls back to full.
      - Created when first needed. A checkpoint missing from it is still usable; only the resize check is lost.
    type: path
    default: /var/lib/fleetbackup/checkpoints
requirements:
  - qemu.qmp (Python package)
  - QEMU 7.2 or newer
notes:
  - Run the module on the hypervisor that runs the VM; the sockets are local.
  - This module belongs to the C(fleetbackup.qemu.qmp) action group, so C(module_defaults) can set
    O(qmp_socket) once for a play.
"""

    BACKUP_ID = r"""
options:
  backup_id:
    description:
      - Name of the backup. Every QEMU object and file that the backup creates is named from it, which is
        how M(fleetbackup.qemu.qemu_backup_stop) finds them again.
      - Letters, digits, C(_) and C(-); at most 32 characters.
    type: str
    required: true
  scratch_dir:
    description:
      - Directory for the scratch images that hold the point-in-time view while the guest writes, for the
        backup's state file and for the default NBD socket.
      - Must exist and be writable, with room for what the guest overwrites during the backup.
      - M(fleetbackup.qemu.qemu_backup_start) and M(fleetbackup.qemu.qemu_backup_stop) must be given the same one.
    type: path
    default: /var/tmp
"""
