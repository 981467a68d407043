"""Write each host's recap, failures and task results to the JSON file named by RESULTS_FILE.

With CRASH_PID and CRASH_AT_TASK set, it also kills that process (a test's QEMU) with SIGKILL when the task of
that name starts, and waits until it is gone: a crash at a known moment of a playbook.
"""

import json
import os
import sys

from ansible.plugins.callback import CallbackBase

# Loaded by ansible-playbook, outside pytest: the tests' support package sits two directories up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from support.processes import end_process  # noqa: E402

DOCUMENTATION = """
name: results_file
type: aggregate
short_description: test support, writes play results as JSON
description: Writes per host stats and failure messages to the file in RESULTS_FILE.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "results_file"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.failures = {}
        self.tasks = {}

    def v2_playbook_on_task_start(self, task, is_conditional):
        if task.name == os.environ.get("CRASH_AT_TASK"):
            end_process(int(os.environ["CRASH_PID"]))

    def v2_runner_on_failed(self, result, ignore_errors=False):
        if not ignore_errors:
            self.failures.setdefault(result._host.get_name(), []).append(
                "%s: %s" % (result._task.get_name(), result._result.get("msg", result._result)))

    def v2_runner_on_ok(self, result):
        self.tasks.setdefault(result._host.get_name(), {})[result._task.name] = {
            key: value for key, value in result._result.items() if not key.startswith("_")}

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed)
        with open(os.environ["RESULTS_FILE"], "w") as stream:
            json.dump(dict(stats={h: stats.summarize(h) for h in hosts}, failures=self.failures, tasks=self.tasks),
                      stream, default=str)
