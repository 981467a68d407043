# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: run_summary
short_description: One VM's run summary from its host's variables, for the run report
version_added: 0.1.0
description:
  - Given a VM host's variables (C(hostvars[host])), returns its C(qemu_backup_summary), the fact that the
    C(fleetbackup.qemu.qemu_backup) role sets, with the host's C(fleetbackup_hypervisor) as C(hypervisor) when the
    fleet playbook named one.
  - 'A host without a summary (its hypervisor was unreachable, or the run stopped before it) becomes
    C({vm, result: unreached, reason}), so that M(fleetbackup.qemu.qemu_backup_report) counts it.'
  - A summary given instead of host variables comes back as it is.
author:
  - fleetbackup.qemu developers (@fleetbackup)
options:
  _input:
    description: A VM host's variables, or a run summary.
    type: dict
    required: true
"""

EXAMPLES = r"""
- name: Report the fleet's run
  fleetbackup.qemu.qemu_backup_report:
    summaries: "{{ groups['fleetbackup_vms'] | map('extract', hostvars) | map('fleetbackup.qemu.run_summary') | list }}"
"""

RETURN = r"""
_value:
  description: The run summary, with C(vm) and C(result) always.
  type: dict
"""

NO_RESULT = "no result: its hypervisor was unreachable, or the run stopped before it"


def run_summary(host):
    if "result" in host:  # a summary already
        return dict(host)
    summary = dict(host.get("qemu_backup_summary") or dict(
        vm=host.get("qemu_backup_vm") or host.get("inventory_hostname", "?"), result="unreached", reason=NO_RESULT))
    if host.get("fleetbackup_hypervisor"):
        summary["hypervisor"] = host["fleetbackup_hypervisor"]
    return summary


class FilterModule:
    def filters(self):
        return dict(run_summary=run_summary)
