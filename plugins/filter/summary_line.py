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
  - The line goes on to say when the VM breached its recovery-point objective (C(rpo) of the summary), and when its
    change rate was flagged (C(change)), as M(fleetbackup.qemu.qemu_backup_report) reports them.
  - Given a host's variables (C(hostvars[host])), it reads their C(qemu_backup_summary) as
    P(fleetbackup.qemu.run_summary#filter) does; a host without one (its hypervisor was unreachable) gets a line
    saying so.
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

import time

from ansible.errors import AnsibleFilterError
from ansible.module_utils.common.text.formatters import bytes_to_human

from ansible_collections.fleetbackup.qemu.plugins.filter.run_summary import run_summary
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.run_report import vm_entry, warnings


def summary_line(summary):
    summary = run_summary(summary)
    vm = summary.get("vm", "?")
    if summary.get("result") == "ok":
        line = "%s: %s%s %s in %s s" % (vm, summary["level"], " (offline)" if summary.get("offline") else "",
                                        bytes_to_human(int(summary["bytes"])), summary["seconds"])
    else:
        line = "%s: %s: %s" % (vm, summary.get("result", "failed"), summary.get("reason", "no reason given"))
    try:
        found = warnings(vm_entry(summary, {}, int(time.time()), None))
    except UserError as err:
        raise AnsibleFilterError(str(err)) from None
    return "; ".join([line] + found)


class FilterModule:
    def filters(self):
        return dict(summary_line=summary_line)
