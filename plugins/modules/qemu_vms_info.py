#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_vms_info
short_description: Find the VMs of a hypervisor, running or stopped, with a stable identity for each
version_added: 0.1.0
description:
  - Finds the QEMU VMs of the hypervisor it runs on, for a play that backs up every VM of a fleet without listing them
    in the inventory. A VM added later is found by the next run.
  - Running VMs of your own QEMU are found by QMP socket patterns (O(qmp_sockets)); each is asked its name and UUID.
  - VMs that libvirt manages are found through libvirt (O(libvirt_uri)), running or shut off.
  - Stopped VMs of your own QEMU are found in fleetbackup's private state (O(state_dir)), which records a VM's disks
    whenever a module of this collection talks to it while it runs. Their images are backed up from those records,
    never from what a repository says.
  - Each VM gets a RV(vms[].repository_name) for its directory in the repository. A VM with a UUID (every libvirt
    domain; a QEMU started with C(-uuid)) is named C(<name>.<first 8 hex digits of its UUID>), so it keeps its chain
    when it moves to another hypervisor. A VM without one is named C(<name>@<hypervisor>), so two VMs of one name on
    two hypervisors never share a directory; such a VM that moves starts a new chain, and RV(vms[].identity) says so.
  - With O(repository), it also lists the repository's VMs that it did not find (RV(missing)).
  - It changes nothing.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.repository.link
options:
  qmp_sockets:
    description:
      - Glob patterns of the QMP sockets of your own QEMU VMs, each a socket that fleetbackup can use alone (see
        M(fleetbackup.qemu.qemu_backup_start)).
      - A VM without C(-name) is named after the directory of its socket.
    type: list
    elements: str
    default: []
  libvirt_uri:
    description: Also list the domains of this libvirt; not asked when unset.
    type: str
    aliases: [uri]
  state_dir:
    description: fleetbackup's private directory on the hypervisor, where stopped VMs of your own QEMU are known from.
    type: path
    default: /var/lib/fleetbackup
  hypervisor:
    description: This hypervisor's name in the inventory, for the RV(vms[].repository_name) of VMs without a UUID.
    type: str
    required: true
  repository:
    description: A repository on this host, to report its VMs that were not found (RV(missing)).
    type: path
  timeout:
    description: Seconds to wait for each QMP monitor.
    type: float
    default: 5
requirements:
  - qemu.qmp (Python package), for O(qmp_sockets)
  - libvirt's Python bindings (Debian package python3-libvirt), for O(libvirt_uri)
attributes:
  check_mode:
    support: full
    description: It changes nothing anyway.
"""

EXAMPLES = r"""
- name: Find every VM of this hypervisor
  fleetbackup.qemu.qemu_vms_info:
    qmp_sockets: [/run/vms/*/qmp.sock]
    libvirt_uri: qemu:///system
    hypervisor: "{{ inventory_hostname }}"
  register: found

- name: Back up each of them as a host of its own
  ansible.builtin.add_host:
    name: "{{ item.repository_name }}"
    groups: fleetbackup_vms
    qemu_backup_hypervisor: "{{ inventory_hostname }}"
    qemu_backup_vm: "{{ item.repository_name }}"
    qemu_backup_qmp_socket: "{{ item.connection.qmp_socket | default('') }}"
    qemu_backup_domain: "{{ item.connection.domain | default('') }}"
  loop: "{{ found.vms }}"
"""

RETURN = r"""
vms:
  description: The VMs found, running or stopped.
  returned: success
  type: list
  elements: dict
  contains:
    name:
      description: The VM's name (QEMU's C(-name), the libvirt domain's name, else its socket's directory).
      type: str
      sample: web1
    uuid:
      description: Its UUID, or null for a QEMU without C(-uuid).
      type: str
      sample: 6c0bd1a2-6c4e-4b1e-9d5c-1b0f6f0c0001
    repository_name:
      description: Its directory in the repository, unique across the fleet.
      type: str
      sample: web1.6c0bd1a2
    identity:
      description: C(uuid) when the name carries the UUID, C(hypervisor) when it carries this hypervisor's name.
      type: str
      sample: uuid
    running:
      description: Whether it runs; a stopped VM is backed up from its images.
      type: bool
      sample: true
    connection:
      description: The options that name it for the other modules, C(qmp_socket), or C(domain) and C(libvirt_uri).
      type: dict
      sample: {"domain": "web1", "libvirt_uri": "qemu:///system"}
    found_by:
      description: C(qmp_socket), C(libvirt), or C(state) (stopped, as fleetbackup last saw it running).
      type: str
      sample: qmp_socket
problems:
  description: VMs that were found but could not be asked (a busy monitor), each with the reason.
  returned: success
  type: list
  elements: str
missing:
  description:
    - With O(repository), the repository's VM directories (those with a C(manifest.json)) that match no VM found
      here.
  returned: success
  type: list
  elements: str
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.discovery import discover
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import LINK_ARGUMENT_SPEC, STATE_DIR


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            qmp_sockets=dict(type="list", elements="str", default=[]),
            libvirt_uri=dict(type="str", aliases=["uri"]),
            state_dir=STATE_DIR,
            hypervisor=dict(type="str", required=True),
            repository=dict(type="path"),
            timeout=dict(type="float", default=5),
            **LINK_ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    module.run(lambda m: dict(changed=False, **discover(**m.params)))


if __name__ == "__main__":
    main()
