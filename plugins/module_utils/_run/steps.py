# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""One VM's backup run as steps: begin, start, copy, stop, commit, and abort when any of them fails.

begin, copy and commit work on the repository; start, stop and forget_checkpoints on the VM. qemu_backup runs them
all in one process on a hypervisor that mounts the repository; with the repository on a backup host, each runs
where it belongs, and the run's state, the plain dict `run`, travels between them. Each step adds to it.
"""

from __future__ import annotations

import secrets
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import LUKS, encryption_from
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import shown_paths
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive, this_process
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import recorded_progress
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.change_rate import change_signal
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.consolidation import resume
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.recording import prune_backups, record_backup
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.image_copy import (
    check_backing_encryption,
    check_params,
    copy_or_keep,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.images import remove_stale_partials
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.lease import Lease
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import (
    backup_id_for,
    chain_facts,
    image_file,
    not_due,
    plan_from,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.backups import VmBackups
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.plan import REQUEST_KEYS, check_request
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.checkpoints import describe_disks
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.connection import CheckpointGone

# The copy's tuning, as qemu_backup_copy's defaults.
COPY_REQUESTS = 16
COPY_REQUEST_SIZE = 256 * 1024


def begin(repository, options, check_mode, owner=None):
    """The lease, and whether a backup is due (when none is, the lease is given up again). owner: the process that
    is the whole run, when one is.

    A run that held the lease and died without giving it up left work behind: run["abandoned"] names it; its files
    are removed here, and its backup on the VM by the start. In check mode no lease is taken.
    """
    began = time.time()  # the summary's seconds; the repository's times are whole seconds
    now = int(began)
    run_id = secrets.token_hex(8)
    abandoned = None
    data = repository.load()
    facts = chain_facts(repository, data, now)
    facts["encryption"] = LUKS if options.get("encryption") else None
    if options["level"] != "full" and not not_due(facts, options["max_age"], now):
        check_chain_secret(repository, facts, options.get("encryption"))  # once: one secret per chain
    if not check_mode:
        # The backup's id follows from its name: a run that takes over can end the backup on the VM.
        taken = Lease(repository).take(run_id, options["holder"], options["lock_ttl"], now, owner=owner,
                                       work=dict(name=facts["name"], backup_id=backup_id_for(repository.vm,
                                                                                             facts["name"])))
        abandoned = (taken["taken_over"] or {}).get("work")
    reason = not_due(facts, options["max_age"], now)
    run = dict(run_id=run_id, vm=repository.vm, repository=repository.path, began=began, facts=facts,
               due=reason is None, reason=reason, abandoned=abandoned, notes=[])
    if not check_mode:
        try:
            resume(repository, lambda: renew(repository, run, options))  # a merge a killed run left
            _discard_abandoned(repository, run)
        except BaseException:
            Lease(repository).release(run_id)
            raise
        # A run of one process keeps it until it ended the dead run's backup on the VM; steps pass that on to
        # the start, which needs no lease.
        if not run["due"] and not (owner and abandoned_backup(run)):
            Lease(repository).release(run_id)
    return run


def check_chain_secret(repository, facts, encryption):
    """UserError, before the lease is taken and the VM touched, when the encrypted chain that this run would continue
    gets no secret (a run that forgot it must not start a plain chain unasked), or one that does not open it."""
    newest = facts["newest"]
    encrypted = [disk for disk in (newest or {}).get("disks", ()) if disk.get("encryption")]
    if not encrypted or facts["missing"]:
        return
    if not encryption:
        raise UserError("The chain of backup %s is encrypted: give encryption, with its secret, or level full to "
                        "start a chain that is not encrypted." % newest["name"])
    check_backing_encryption(repository.image(encrypted[0]["file"]), encryption_from(encryption))


def abandoned_backup(run):
    """The backup id of the dead run this run took over, which must still be ended on the VM; or None."""
    return (run.get("abandoned") or {}).get("backup_id")


def renew(repository, run, options, ttl=None, work=None):
    """Hold the lease for ttl more seconds (default lock_ttl); UserError when another run took it meanwhile."""
    lease = Lease(repository)
    lease.check(run["run_id"], time.time())
    lease.take(run["run_id"], options["holder"], ttl or options["lock_ttl"], int(time.time()), owner=options.get(
        "owner"), work=work or lease.work(run["run_id"]))


def _discard_abandoned(repository, run):
    """Remove the files of the dead run that held the lease before this one and that no backup lists."""
    abandoned = run.get("abandoned")
    if not abandoned or not abandoned.get("name"):
        return []
    removed = repository.discard_unlisted(abandoned["name"], planned_files(abandoned["name"],
                                                                           abandoned.get("disks", ())))
    removed += remove_stale_partials(repository.working)  # its copies' partial images, whose writer is gone
    if removed:
        run.update(cleaned_up=True)
        run["notes"].append("A run that died left files of backup %s, now removed: %s"
                            % (abandoned["name"], ", ".join(removed)))
    return removed


def start(vm, run, options, check_mode):
    """Plan from one listing of the VM's disks, and start the backup. A dead run's backup is ended first."""
    backups = VmBackups(vm)
    end_abandoned(vm, run, check_mode)
    if not run["due"]:
        return run
    _give_back_checkpoint(vm, run, check_mode)
    facts = run["facts"]
    planned = plan_from(facts, options["level"], 0, describe_disks(vm.disks(), vm.registry), options["disks"],
                        int(run["began"]))
    request = {key: options.get(key) for key in REQUEST_KEYS}
    request.update(disks=[disk["disk"] for disk in planned["disks"]], checkpoint=planned["checkpoint"],
                   incremental=planned["incremental"])
    check_request(request)
    run.update(plan=planned, change=_change(facts, planned))
    _changed, run["started"] = backups.start(planned["backup_id"], request, check_mode)
    _add_notes(run, vm)
    return run


def end_abandoned(vm, run, check_mode):
    """End on the VM the backup of the dead run this run took over, and remove the checkpoint it opened, which no
    backup lists; undo a pause or freeze it left (the stop recovers the VM)."""
    backup_id = abandoned_backup(run)
    if not backup_id or check_mode:
        return
    _changed, removed, _intact = VmBackups(vm).stop(backup_id, True, check_mode)
    checkpoint = "ckpt-%s" % run["abandoned"]["name"]
    forgotten = [] if checkpoint in run["facts"]["checkpoints"] else forget_checkpoints(vm, [checkpoint], check_mode)
    if removed or forgotten:
        run.update(cleaned_up=True)
        run["notes"].append("Ended backup %s, which a run that died left running." % backup_id)
    _add_notes(run, vm)


def _add_notes(run, vm):
    """The connection's notes, each once: one connection serves several steps."""
    run["notes"].extend(note for note in vm.notes if note not in run["notes"])


def _give_back_checkpoint(vm, run, check_mode):
    """libvirt forgets checkpoints when a domain is defined again; their bitmaps stay in the images."""
    newest = run["facts"]["newest"]
    xml = ((newest or {}).get("definition") or {}).get("checkpoint_xml")
    if not xml or not vm.keeps_checkpoint_definitions:
        return
    try:
        given_back, _disks = vm.restore_checkpoint(newest["checkpoint"], xml, check_mode)
        if given_back:
            run["notes"].append("Gave libvirt back checkpoint %s from the repository (the domain was defined again "
                                "without it); its chain goes on." % newest["checkpoint"])
    except CheckpointGone as err:
        run["notes"].append(str(err))  # the plan then takes a full backup, and says why


def _change(facts, planned):
    incremental = [disk for disk in planned["disks"] if disk["mode"] == "incremental"]
    if not incremental:
        return None
    return change_signal(facts["history"], sum(d["expected_bytes"] for d in incremental),
                         sum(d["size"] for d in incremental), [d["disk"] for d in incremental])


def copy(repository, run, options, check_mode, warn):
    """Copy every started disk into the repository, under the lease held for as long as the copies may take."""
    name = checked_plan(repository, run, check_mode)
    planned = {disk["disk"]: disk for disk in run["plan"]["disks"]}
    work = dict(name=name, backup_id=backup_id_for(repository.vm, name), disks=sorted(planned))
    if not check_mode:
        # The copying process owns the lease while it copies: an abort elsewhere must not discard under it.
        renew(repository, run, dict(options, owner=this_process()), options["copy_timeout"] + options["lock_ttl"],
              work)
    copies = []
    deadline = time.monotonic() + options["copy_timeout"]  # for the copies of every disk together
    for started in run["started"]["disks"]:
        disk = planned[started["disk"]]
        incremental = started["mode"] == "incremental"
        params = dict(src=started["url"], tls_certificates=options.get("tls_certificates"),
                      dest=repository.image(disk["file"]), format="qcow2", force=False,
                      dirty_bitmap=started["dirty_bitmap"] if incremental else None,
                      backing=repository.image(disk["backing"]) if incremental else None,
                      backing_format=disk["backing_format"] if incremental else "qcow2",
                      connections=options["connections"], requests=COPY_REQUESTS, request_size=COPY_REQUEST_SIZE,
                      compress=options["compress"], compress_level=options["compress_level"],
                      encryption=options.get("encryption"))
        dest_dir = check_params(params)
        with recorded_progress(options["state_dir"], shown_paths(params["dest"]), check_mode, warn) as progress:
            copied = copy_or_keep(params, dest_dir, options["bandwidth"], progress, check_mode, warn, deadline)
            if progress:
                progress.end(summary=copied.get("msg"))
        copies.append(dict(shown_paths(copied), disk=started["disk"]))  # paths that mean the same in any process
    run["copies"] = copies
    if not check_mode:  # the copies' results stay here too: the commit records these, not what travelled
        renew(repository, run, options, work=dict(work, copies=copies))
    return run


def planned_files(name, disks):
    """The images a backup named `name` writes of these disks: the one scheme, which the plan follows."""
    return [image_file(name, disk) for disk in disks]


def checked_plan(repository, run, check_mode):
    """The name of the backup, as this run's begin chose it on this host; UserError unless the run's plan writes
    exactly its images and builds on the newest recorded backup's, whatever the run passed through."""
    work = {} if check_mode else (Lease(repository).work(run["run_id"]) or {})
    name = work.get("name") or run["facts"]["name"]
    planned = run["plan"]
    newest = repository.load()["backups"]
    parent_files = {disk["file"] for disk in newest[-1]["disks"]} if newest else set()
    for disk in planned["disks"]:
        if planned["name"] != name or disk["file"] != image_file(name, disk["disk"]) or (
                disk["mode"] == "incremental" and disk["backing"] not in parent_files):
            raise UserError("The run's plan is not the one its begin made for backup %s (it names %s, writes %s on "
                            "%s): pass the run as the steps returned it." % (name, planned["name"], disk["file"],
                                                                             disk["backing"]))
    return name


def stop(vm, run, check_mode):
    """End the backup; run["intact"]: whether its point-in-time view held until now."""
    _changed, _removed, run["intact"] = VmBackups(vm).stop(run["plan"]["backup_id"], False, check_mode)
    _add_notes(run, vm)
    return run


def commit(repository, run, options, check_mode):
    """Record the backup, prune (whole chains, and points the calendar does not keep, merged away), and give the lease
    up; run["obsolete_checkpoints"]: the checkpoints no backup needs any more, for forget_checkpoints()."""
    planned = run["plan"]
    if run.get("intact") is False:
        raise UserError("The point-in-time view of backup %s broke before the stop: the guest overwrote data that "
                        "the scratch space could not keep (too little room, or cbw_timeout). The guest's writes "
                        "landed; this backup is not kept." % planned["name"])
    copies = run["copies"]
    if not check_mode:
        renew(repository, run, options)  # a lease about to expire must not pass the check and lapse mid-write
        checked_plan(repository, run, check_mode)
        copies = (Lease(repository).work(run["run_id"]) or {}).get("copies") or []
    started = run["started"]
    run["recorded"] = record_backup(repository, planned, started["disks"], copies, started.get("libvirt"),
                                    dict(consistency=started["consistency"], freeze=started["freeze"]), check_mode)
    # Recorded: what follows may fail, and is then only noted, never undone.
    run.update(pruned=[], consolidated=[], obsolete_checkpoints=[])
    try:
        pruned, merged, run["obsolete_checkpoints"] = prune_backups(
            repository, options, lambda: renew(repository, run, options), check_mode)
        run.update(pruned=[b["name"] for b in pruned], consolidated=merged)
    except (FleetbackupError, OSError) as err:
        run["notes"].append("Backup %s is recorded, but pruning failed: %s" % (planned["name"], err))
    if not check_mode:
        Lease(repository).release(run["run_id"])
    return run


def forget_checkpoints(vm, names, check_mode):
    """Remove these checkpoints from the disks that hold them; the names removed."""
    removed = []
    for name in names:
        holders = [disk for disk in vm.disks() if name in disk.bitmaps]
        if holders:
            if not check_mode:
                vm.change_checkpoint(name, holders, False)
            removed.append(name)
    return removed


def abort_vm(vm, run):
    """End the failed run's backup and remove the checkpoint it opened, even when it was stopped already; whether
    there was any of it to end."""
    planned = run.get("plan")
    if not planned or run.get("recorded"):
        return False
    stopped, _removed, _intact = VmBackups(vm).stop(planned["backup_id"], True, False)
    return bool(forget_checkpoints(vm, [planned["checkpoint"]], False)) or stopped


def abort_repository(repository, run):
    """Remove what the failed run wrote, if it still holds the lease, and give the lease up; (the files removed,
    whether the lease was given up)."""
    lease = Lease(repository)
    try:
        lease.check(run["run_id"], time.time())
    except UserError:
        return [], False  # another run holds the repository now: nothing here is ours to remove
    work = lease.work(run["run_id"]) or {}
    copier = lease.owner(run["run_id"])
    if copier and copier != this_process() and process_alive(copier):
        raise UserError("A copy of this run still runs (process %d on %s) and holds the lease; it ends by itself "
                        "(it fails once the backup is stopped), and the next run cleans up after it."
                        % (copier["pid"], copier["host"]))
    try:
        disks = work.get("disks") or [disk["disk"] for disk in (run.get("plan") or {}).get("disks", ())]
        removed = repository.discard_unlisted(work["name"], planned_files(work["name"], disks))
    finally:
        released = lease.release(run["run_id"])
    return removed, released
