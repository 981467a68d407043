# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: summary_line
short_description: One line about one VM's backup run
version_added: 0.1.0
description:
  - Formats the C(qemu_backup_summary) fact that the C(fleetbackup.qemu.qemu_backup) role sets for a VM as one line
    for a fleet's summary, such as "web1.6c0bd1a2 - incremental 1.0 MiB in 3 s", or "db1@hv2 - failed" and the
    reason.
  - Given a host's variables (C(hostvars[host])), it reads their C(qemu_backup_summary); a host without one (its
    hypervisor was unreachable) gets a line saying so.
author:
  - fleetbackup.qemu developers (@fleetbackup)
options:
  _input:
    description: The role's C(qemu_backup_summary) of a VM, or the VM host's variables.
    type: dict
    required: true
"""

EXAMPLES = r"""
- name: One line per VM
  ansible.builtin.debug:
    msg: "{{ groups['fleetbackup_vms'] | map('extract', hostvars) | map('fleetbackup.qemu.summary_line') | list }}"
"""

RETURN = r"""
_value:
  description: The line.
  type: str
"""

from ansible.module_utils.common.text.formatters import bytes_to_human


def summary_line(summary):
    if "result" not in summary:  # a host's variables
        summary = summary.get("qemu_backup_summary") or dict(
            vm=summary.get("inventory_hostname", "?"), result="failed",
            reason="no result: its hypervisor was unreachable, or the run stopped before it")
    vm = summary.get("vm", "?")
    if summary.get("result") == "ok":
        return "%s: %s%s %s in %s s" % (vm, summary["level"], " (offline)" if summary.get("offline") else "",
                                        bytes_to_human(int(summary["bytes"])), summary["seconds"])
    return "%s: %s: %s" % (vm, summary.get("result", "failed"), summary.get("reason", "no reason given"))


class FilterModule:
    def filters(self):
        return dict(summary_line=summary_line)
