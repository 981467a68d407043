# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Where a fleet's run reports live, and one run of the report: read the previous, build, write, publish, prune.

The report directory is a private one of ours (mode 0700): the counters and the VMs that the next run carries over
are read back only from files that we made there. Every refusal comes before anything is written.
"""

from __future__ import annotations

import contextlib
import os
import re

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.published_file import PublishedDirectory
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.run_metrics import METRICS_FILE, prometheus_text
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.run_report import (
    build_report, rpo_seconds, run_name, summary_message)

LATEST = "latest.json"
LOCK = "lock"
# A run's own report: its UTC time, and a number when two runs share a second.
RUN_REPORT = re.compile(r"^(\d{8}T\d{6}Z)(?:-(\d+))?\.json$")
# How many run reports a report directory keeps by default: a week of hourly runs.
KEEP_REPORTS = 168
# Seconds a run waits for another run of the report to finish writing.
LOCK_TIMEOUT = 60
METRICS_PURPOSE = "node_exporter's textfile-collector directory (--collector.textfile.directory)"


class ReportStore:
    """The report directory: latest.json, one report per run, and the lock that makes runs take turns."""

    def __init__(self, path, create):
        self.directory = PrivateDir(path, "report_dir").prepare(create)

    def latest(self):
        return self.directory.read_json(LATEST)

    def free_name(self, now):
        """The name of this run's report: its time, numbered when an earlier run of the same second took it."""
        base = name = run_name(now)
        number = 1
        while os.path.lexists(self.directory.path_of(name + ".json")):
            name = "%s-%d" % (base, number)
            number += 1
        return name

    def save(self, report):
        """Write the run's report and make it the latest; the run's report's path."""
        self.directory.write_json(report["name"] + ".json", report)
        self.directory.write_json(LATEST, report)
        return self.directory.path_of(report["name"] + ".json")

    def prune(self, keep):
        """Remove the oldest run reports beyond the newest keep (0: all; latest.json stays); their names."""
        found = [RUN_REPORT.match(name) for name in os.listdir(self.directory.path)]
        names = [match.group(0) for match in sorted(filter(None, found),
                                                    key=lambda match: (match.group(1), int(match.group(2) or 0)))]
        doomed = names[:-keep] if keep else names
        for name in doomed:
            self.directory.remove(name)
        return doomed

    def lock(self):
        return self.directory.lock(LOCK, LOCK_TIMEOUT, "The report directory %s" % self.directory.path)


def report_run(summaries, report_dir, now, metrics_dir=None, rpo=None, keep_reports=KEEP_REPORTS, forget=(),
               check_mode=False):
    """Build the run's report on the previous one and, unless check_mode, write it, publish its metrics and prune.

    Returns the module's result: changed, report, msg, and the files written (None in check mode).
    """
    if keep_reports < 0:
        raise UserError("keep_reports is %d: give how many run reports to keep, 0 or more." % keep_reports)
    default_rpo = rpo_seconds(rpo, "every VM (option rpo)")
    metrics = PublishedDirectory(metrics_dir, "metrics_dir", METRICS_PURPOSE) if metrics_dir else None
    try:
        store = ReportStore(report_dir, create=not check_mode)
        with contextlib.nullcontext() if check_mode else store.lock():
            report = build_report(summaries, store.latest(), now, store.free_name(now), default_rpo, forget)
            result = dict(changed=not check_mode, report=report, msg=summary_message(report), report_file=None,
                          latest_file=None, metrics_file=None, pruned=[])
            if check_mode:
                return result
            result.update(report_file=store.save(report), latest_file=store.directory.path_of(LATEST))
            if metrics:
                result["metrics_file"] = metrics.publish(METRICS_FILE, prometheus_text(report).encode())
            result["pruned"] = store.prune(keep_reports)
            return result
    finally:
        if metrics:
            metrics.close()
