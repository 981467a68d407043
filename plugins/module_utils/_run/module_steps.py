# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""qemu_backup's work: its options as a run's settings, and each step it can run, on the host it belongs to."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import parse_bandwidth
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.image_copy import check_compression
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.lease import check_ttl
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import parse_duration
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.retention import CALENDAR_RULES
from ansible_collections.fleetbackup.qemu.plugins.module_utils._run import steps
from ansible_collections.fleetbackup.qemu.plugins.module_utils._run.background import follow, run_in_background
from ansible_collections.fleetbackup.qemu.plugins.module_utils._run.one_shot import (
    RunFailed,
    back_up,
    describe_plan,
    result,
    summarize,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import REQUEST_KEYS

# The steps that may go on in the background, after background_after seconds.
BACKGROUND_STEPS = ("all", "copy")
# What each step needs: the VM, the repository, a run from an earlier step.
NEEDS = dict(all=("vm", "repository"), begin=("repository",), start=("vm", "run"), copy=("repository", "run"),
             stop=("vm", "run"), commit=("repository", "run"), abort=("run",), follow=("job",))


def settings(params):
    """The run's settings from the module's options, checked before anything is created."""
    check_ttl(params["lock_ttl"])
    if params["connections"] is not None and not 1 <= params["connections"] <= 16:
        raise UserError("connections must be 1 to 16.")
    # The steps on the VM's host of a run whose repository is elsewhere copy nothing: they need no zstandard.
    check_compression(params["compress"], params["compress_level"], copies_here="repository" in NEEDS[params["step"]],
                      encryption=params["encryption"])
    if params["encryption"] and any(params[rule] for rule in CALENDAR_RULES):
        raise UserError("%s drop points by consolidating, which this version does only for plain chains: with "
                        "encryption, keep whole chains with keep_chains." % ", ".join(CALENDAR_RULES))
    options = {key: params.get(key) for key in REQUEST_KEYS}
    options.update(
        level=params["level"], max_age=parse_duration(params["max_age"]), disks=params["disks"],
        keep_chains=params["keep_chains"], holder=params["holder"], lock_ttl=params["lock_ttl"],
        **{rule: params[rule] for rule in CALENDAR_RULES},
        copy_timeout=params["copy_timeout"], connections=params["connections"],
        bandwidth=parse_bandwidth(params["bandwidth"]), compress=params["compress"],
        compress_level=params["compress_level"], tls_certificates=params["tls_certificates"],
        state_dir=params["state_dir"], rpo=parse_duration(params["rpo"]) if params["rpo"] else None,
        encryption=params["encryption"])
    return options


def run_step(module):
    params = module.params
    step = params["step"]
    for need in NEEDS[step]:
        missing = dict(vm=not module.names_vm, repository=not params["repository"] or not params["vm"],
                       run=not params["run"], job=not params["job"])[need]
        if missing:
            raise UserError("step %s needs %s." % (step, dict(
                vm="the VM: qmp_socket or domain", repository="repository and vm", run="run, as the step before "
                "returned it", job="job, as qemu_backup returned it")[need]))
    if "vm" in NEEDS[step]:
        module.check_vm_libraries()  # before the lease: a run that cannot reach its VM takes nothing
    if step == "follow":
        outcome = follow(params["state_dir"], params["job"], params["wait"])
        if params["fail_if_running"] and not outcome["finished"]:
            raise UserError("The backup run job %s is still at work (%s), and holds the repository's lease until it "
                            "ends; follow it with fleetbackup.qemu.qemu_backup, step follow, job %s."
                            % (params["job"], outcome["progress"], params["job"]))
        return _followed(module, outcome)
    options = settings(params)
    work = _all if step == "all" else STEPS[step]
    if step in BACKGROUND_STEPS and params["background_after"] and not module.check_mode:
        def in_background(job_record):
            return work(module, options, params["run"], job_record)

        return _followed(module, run_in_background(in_background, params["background_after"], params["state_dir"]))
    return _followed(module, dict(work(module, options, params["run"]), finished=True))


def _repository(module, create):
    params = module.params
    return Repository(params["repository"], params["vm"], params["follow_repository_link"], create=create,
                      missing_ok=True)


def _all(module, options, _run, job_record=None):
    warnings = []
    try:
        outcome = back_up(options, lambda create: _repository(module, create), module.vm, module.check_mode,
                          warnings.append, job_record and (lambda run: job_record(_dests(run))))
    except RunFailed as err:
        return dict(failed=True, msg=str(err), summary=err.summary, warnings=warnings)
    return dict(outcome, warnings=warnings + outcome["notes"])


def _dests(run):
    """(image, disk) of each copy, where its progress is recorded."""
    return [[run["repository"] + "/" + disk["file"], disk["disk"]] for disk in run["plan"]["disks"]]


def _followed(module, outcome):
    """A run's result, its warnings (of whichever process ran it) shown as the module's own."""
    module.warn_all(outcome.pop("warnings", []))
    return outcome


def _begin(module, options, _run):
    with _repository(module, not module.check_mode) as repository:
        run = steps.begin(repository, options, module.check_mode)
    return _step_result(run, options, module.check_mode, changed=run.get("cleaned_up", False))


def _start(module, options, run):
    with module.vm() as vm:
        steps.start(vm, run, options, module.check_mode)
    return _step_result(run, options, module.check_mode, changed=run["due"] or run.get("cleaned_up", False))


def _copy(module, options, run, job_record=None):
    warnings = []
    if job_record:
        job_record(_dests(run))
    with _repository(module, False) as repository:
        steps.copy(repository, run, options, module.check_mode, warnings.append)
    return dict(_step_result(run, options, module.check_mode, changed=True), warnings=warnings)


def _stop(module, options, run):
    """The stop; and once the view proved to have held, the checkpoints that the new backup supersedes go."""
    with module.vm(ending=run["plan"]["backup_id"]) as vm:
        steps.stop(vm, run, module.check_mode)
        if run["intact"] is not False:
            run["removed_checkpoints"] = steps.forget_checkpoints(vm, run["facts"]["checkpoints"],
                                                                  module.check_mode)
    return _step_result(run, options, module.check_mode, changed=True)


def _commit(module, options, run):
    with _repository(module, False) as repository:
        steps.commit(repository, run, options, module.check_mode)
    return dict(result(run, options, module.check_mode), run=run)


def _abort(module, options, run):
    """What this host can undo of a failed run: the VM's backup and checkpoint, the repository's files and lease."""
    removed, ended, released, undo = [], False, False, module.params["undo"]
    if "vm" in undo and module.names_vm and run.get("plan") and not module.check_mode:
        with module.vm(ending=run["plan"]["backup_id"]) as vm:
            ended = steps.abort_vm(vm, run)
    if "repository" in undo and module.params["repository"] and not module.check_mode:
        with _repository(module, False) as repository:
            removed, released = steps.abort_repository(repository, run)
    reason = module.params["reason"] or "the run was aborted"
    return dict(changed=ended or released or bool(removed), discarded=removed,
                summary=summarize(run, options, "failed", reason), run=run)


def _step_result(run, options, check_mode, changed):
    return dict(changed=changed, run=run, msg=describe_plan(run),
                summary=result(run, options, check_mode)["summary"], notes=run["notes"])


STEPS = dict(begin=_begin, start=_start, copy=_copy, stop=_stop, commit=_commit, abort=_abort)
