"""Write each host's recap, failures and task results to the JSON file named by RESULTS_FILE.

With AT_TASK and AT_TASK_COMMAND (a JSON argv) set, it also runs that command when the task of that name first
starts, and waits for it: something happens at a known moment of a playbook (a crash, guest writes).
"""

import json
import os
import subprocess

from ansible.plugins.callback import CallbackBase

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
        self.hook_ran = False

    def v2_playbook_on_task_start(self, task, is_conditional):
        if task.name == os.environ.get("AT_TASK") and not self.hook_ran:
            self.hook_ran = True
            subprocess.run(json.loads(os.environ["AT_TASK_COMMAND"]), check=True)

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
