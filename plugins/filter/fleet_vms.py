# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: fleet_vms
short_description: One entry per VM of a fleet, from every hypervisor's discovery
version_added: 0.1.0
description:
  - Takes the variables of the hypervisors that ran M(fleetbackup.qemu.qemu_vms_info) (registered as
    C(fleetbackup_found)) and gives one entry per repository directory across the fleet.
  - A VM that moved to another hypervisor is still listed as stopped where it ran before; the hypervisor where it
    runs wins. Two hypervisors that both run it, or only list it stopped, cannot be told apart, and the entry
    carries a C(conflict) saying so.
author:
  - fleetbackup.qemu developers (@fleetbackup)
options:
  _input:
    description: The hypervisors' variables (C(hostvars[host])), each with C(inventory_hostname),
      C(qemu_hypervisor_state_dir) and C(fleetbackup_found).
    type: list
    elements: dict
    required: true
"""

EXAMPLES = r"""
- name: Add each VM as a host of its own
  ansible.builtin.add_host:
    name: "{{ item.vm.repository_name }}"
    fleetbackup_hypervisor: "{{ item.hypervisor }}"
  loop: "{{ ansible_play_hosts | map('extract', hostvars) | selectattr('fleetbackup_found', 'defined')
            | fleetbackup.qemu.fleet_vms }}"
"""

RETURN = r"""
_value:
  description: One entry per VM.
  type: list
  elements: dict
  contains:
    hypervisor:
      description: The hypervisor that backs the VM up.
      type: str
    state_dir:
      description: That hypervisor's private state directory.
      type: str
    vm:
      description: The VM as M(fleetbackup.qemu.qemu_vms_info) described it.
      type: dict
    conflict:
      description: Why the VM cannot be backed up (listed by more than one hypervisor alike); empty otherwise.
      type: str
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.discovery import choose_fleet_vms


class FilterModule:
    def filters(self):
        return dict(fleet_vms=choose_fleet_vms)
