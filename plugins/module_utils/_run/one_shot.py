# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A whole backup run of one VM in one process, on a hypervisor that mounts the VM's repository; and the summary
of a run, the same whichever way it ran."""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import size
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.lease import Lease
from ansible_collections.fleetbackup.qemu.plugins.module_utils._run.steps import (
    abandoned_backup,
    abort_repository,
    abort_vm,
    begin,
    commit,
    copy,
    end_abandoned,
    forget_checkpoints,
    start,
    stop,
)


class RunFailed(FleetbackupError):
    """A run that failed, recorded nothing and removed what it made; summary says so, for the fleet's report."""

    def __init__(self, message, summary):
        super().__init__(message)
        self.summary = summary


def back_up(options, open_repository, open_vm, check_mode, warn, planned=None):
    """The run's result: begin, start, copy, stop, commit, then forget the checkpoints no backup needs; abort if any
    step fails, and raise RunFailed.

    open_repository(create) and open_vm(ending) open the repository and reach the VM (ending: the id of a backup to
    end even on a VM that is gone); planned(run), when given, learns the plan before the copies begin.
    """
    with open_repository(not check_mode) as repository:
        options = dict(options, owner=this_process())  # the whole run: once it is gone, its lease is free
        run = begin(repository, options, check_mode, owner=options["owner"])
        try:
            if run["due"]:
                _back_up_vm(repository, run, options, open_vm, check_mode, warn, planned)
            elif abandoned_backup(run):  # nothing due, but a dead run's backup still holds the VM
                with open_vm(abandoned_backup(run)) as vm:
                    end_abandoned(vm, run, check_mode)
                Lease(repository).release(run["run_id"])
        except BaseException as err:
            failure = str(err) or type(err).__name__
            if run.get("abort_failure"):
                failure += "; and ending its backup on the VM failed: %s" % run["abort_failure"]
            try:
                if not check_mode:
                    abort_repository(repository, run)
            except FleetbackupError as cleanup:
                failure += "; and removing what it wrote failed: %s" % cleanup
            if not isinstance(err, (FleetbackupError, OSError)):
                raise
            summary = summarize(run, options, "failed", failure)
            raise RunFailed("Backup %s of %s failed and was not recorded: %s"
                            % ((run.get("plan") or run["facts"])["name"], run["vm"], failure), summary) from err
    return result(run, options, check_mode)


def _back_up_vm(repository, run, options, open_vm, check_mode, warn, planned):
    try:
        with open_vm(None) as vm:
            start(vm, run, options, check_mode)
            if check_mode:
                return
            if planned:
                planned(run)
            copy(repository, run, options, check_mode, warn)
            stop(vm, run, check_mode)
            commit(repository, run, options, check_mode)
            try:
                run["removed_checkpoints"] = forget_checkpoints(vm, run["obsolete_checkpoints"], check_mode)
            except FleetbackupError as err:  # recorded: a checkpoint left costs dirty tracking, nothing else
                run["notes"].append("Removing the checkpoints no backup needs (%s) failed: %s"
                                    % (", ".join(run["obsolete_checkpoints"]), err))
    except BaseException:
        if run.get("plan") and not check_mode and "recorded" not in run:
            # A fresh connection: the one that failed may be to a QEMU that died.
            try:
                with open_vm(run["plan"]["backup_id"]) as vm:
                    abort_vm(vm, run)
            except FleetbackupError as err:
                run["abort_failure"] = str(err)
        raise


def result(run, options, check_mode):
    """The module's result of a run that did not fail."""
    recorded = run.get("recorded")
    changed = bool(recorded) or (check_mode and run["due"]) or run.get("cleaned_up", False)
    planned = run.get("plan") or {}
    summary = summarize(run, options, "ok" if recorded else ("would back up" if run["due"] else "nothing due"),
                        planned.get("reason") if run["due"] else run["reason"])
    return dict(changed=changed, summary=summary, msg=describe_plan(run), plan=run.get("plan"), backup=recorded,
                copies=[{key: c.get(key) for key in COPY_KEYS} for c in run.get("copies", ())],
                intact=run.get("intact"), pruned=run.get("pruned", []),
                consolidated=run.get("consolidated", []),
                removed_checkpoints=run.get("removed_checkpoints", []), notes=run["notes"])


# What the result keeps of each disk's copy.
COPY_KEYS = ("disk", "image", "size", "bytes_read", "bytes_zeroed", "bytes_unchanged", "elapsed", "throughput",
             "checksum", "msg")


def summarize(run, options, outcome, reason):
    """The run in the fleet report's terms (the role's qemu_backup_summary)."""
    planned, recorded = run.get("plan") or {}, run.get("recorded")
    newest = recorded or run["facts"]["newest"]
    copies = run.get("copies", ())
    return dict(
        vm=run["vm"], result=outcome, backup=planned.get("name") or (run["facts"]["name"] if run["due"] else None),
        level=recorded["level"] if recorded else planned.get("level"),
        bytes=sum(c.get("bytes_read", 0) for c in copies) if copies else planned.get("expected_bytes", 0)
        if outcome == "would back up" else 0,
        seconds=round(time.time() - run["began"], 3), reason=reason, finished=int(time.time()),
        newest=dict(name=newest["name"], finished=newest["finished"]) if newest else None,
        rpo=options.get("rpo"), change=run.get("change"), offline=(run.get("started") or {}).get("offline", False))


def describe_plan(run):
    """One line: what the run does, or why nothing is due."""
    planned = run.get("plan")
    if not run["due"]:
        return "%s: nothing to do: %s" % (run["vm"], run["reason"])
    if not planned:
        return "%s: backup %s" % (run["vm"], run["facts"]["name"])
    reasons = [planned["reason"]] + [d["reason"] for d in planned["disks"] if d["reason"]]
    return "%s: %s backup %s of %s, expecting to read at most %s (%s)" % (
        run["vm"], planned["level"], planned["name"], ", ".join(d["disk"] for d in planned["disks"]),
        size(planned["expected_bytes"]), "; ".join(reasons))
