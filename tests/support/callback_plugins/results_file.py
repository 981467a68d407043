"""Write each host's recap, failures, task results and span to the JSON file named by RESULTS_FILE.

A host's span is when its first task started and its last one ended (time.time()), how many of its tasks ran and
were skipped, and each task's name, seconds and whether it was skipped: the fleet bench times each VM's backup with
it.

With AT_TASK and AT_TASK_COMMAND (a JSON argv) set, it also runs that command when the task of that name first
starts, and waits for it: something happens at a known moment of a playbook (a crash, guest writes).
"""

import json
import os
import subprocess
import time

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
        self.spans = {}
        self.started = {}

    def _span(self, host):
        return self.spans.setdefault(host, dict(first=time.time(), last=None, ran=0, skipped=0, tasks=[]))

    def _ended(self, result, skipped=False):
        span = self._span(result._host.get_name())
        span["last"] = time.time()
        span["skipped" if skipped else "ran"] += 1
        began = self.started.pop((result._host.get_name(), result._task._uuid), span["last"])
        span["tasks"].append([result._task.get_name(), round(span["last"] - began, 3), skipped, began])

    def v2_runner_on_start(self, host, task):
        self._span(host.get_name())
        self.started[(host.get_name(), task._uuid)] = time.time()

    def v2_runner_on_skipped(self, result):
        self._ended(result, skipped=True)

    def v2_runner_on_unreachable(self, result):
        self._ended(result)

    def v2_playbook_on_task_start(self, task, is_conditional):
        if task.name == os.environ.get("AT_TASK") and not self.hook_ran:
            self.hook_ran = True
            subprocess.run(json.loads(os.environ["AT_TASK_COMMAND"]), check=True)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._ended(result)
        if not ignore_errors:
            self.failures.setdefault(result._host.get_name(), []).append(
                "%s: %s" % (result._task.get_name(), result._result.get("msg", result._result)))

    def v2_runner_on_ok(self, result):
        self._ended(result)
        self.tasks.setdefault(result._host.get_name(), {})[result._task.name] = {
            key: value for key, value in result._result.items() if not key.startswith("_")}

    def v2_playbook_on_stats(self, stats):
        hosts = sorted(stats.processed)
        with open(os.environ["RESULTS_FILE"], "w") as stream:
            json.dump(dict(stats={h: stats.summarize(h) for h in hosts}, failures=self.failures, tasks=self.tasks,
                           spans=self.spans),
                      stream, default=str)
