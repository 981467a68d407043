# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""qemu_backup_report's action: the report is the controller's, so the controller's own process writes it.

A module would cost a process of its own and the packing of its code, about half a second of every fleet run,
to write a few files beside the playbook.
"""

from __future__ import annotations

import time

from ansible.plugins.action import ActionBase

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.report_store import KEEP_REPORTS, report_run

# As the module's DOCUMENTATION declares them (tests/unit/test_report_action.py holds them to it).
ARGUMENT_SPEC = dict(
    summaries=dict(type="list", elements="dict", required=True),
    report_dir=dict(type="path", default="~/.local/state/fleetbackup/reports"),
    metrics_dir=dict(type="path"),
    rpo=dict(type="str"),
    keep_reports=dict(type="int", default=KEEP_REPORTS),
    forget=dict(type="list", elements="str", default=[]),
)


class ActionModule(ActionBase):
    """Write the run's report and metrics, as report_run() does, with the task's arguments checked."""

    TRANSFERS_FILES = False
    _requires_connection = False  # nothing runs on the task's host

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _validation, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        try:
            result.update(report_run(args["summaries"], args["report_dir"], int(time.time()), args["metrics_dir"],
                                     args["rpo"], args["keep_reports"], args["forget"], self._task.check_mode))
        except FleetbackupError as err:
            result.update(failed=True, msg=str(err))
        return result
