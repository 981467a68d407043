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

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import shown_paths
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import recorded_progress
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.change_rate import change_signal
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.recording import prune_backups, record_backup
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.image_copy import check_params, copy_or_keep
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.lease import Lease
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import backup_id_for, chain_facts, not_due, plan_from
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
        _discard_abandoned(repository, run)
        if not run["due"]:
            Lease(repository).release(run_id)
    return run


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
    removed = repository.discard_unlisted(abandoned["name"], abandoned.get("files", ()))
    if removed:
        run["notes"].append("A run that died left files of backup %s, now removed: %s"
                            % (abandoned["name"], ", ".join(removed)))
    return removed


def start(vm, run, options, check_mode):
    """Plan from one listing of the VM's disks, and start the backup. A dead run's backup is ended first."""
    backups = VmBackups(vm)
    abandoned = run.get("abandoned") or {}
    if abandoned.get("backup_id") and not check_mode:
        _changed, removed, _intact = backups.stop(abandoned["backup_id"], True, check_mode)
        if removed:
            run["notes"].append("Ended backup %s, which a run that died left running." % abandoned["backup_id"])
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
    run["notes"].extend(vm.notes)
    return run


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
    planned = {disk["disk"]: disk for disk in run["plan"]["disks"]}
    files = [disk["file"] for disk in run["plan"]["disks"]]
    if run["plan"]["name"] != run["facts"]["name"]:
        raise UserError("The run's plan names backup %s, not %s, which its begin chose: pass the run as the steps "
                        "returned it." % (run["plan"]["name"], run["facts"]["name"]))
    work = dict(name=run["plan"]["name"], backup_id=run["plan"]["backup_id"], files=files)
    if not check_mode:
        renew(repository, run, options, options["copy_timeout"] + options["lock_ttl"], work)
    copies = []
    for started in run["started"]["disks"]:
        disk = planned[started["disk"]]
        incremental = started["mode"] == "incremental"
        params = dict(src=started["url"], tls_certificates=options.get("tls_certificates"),
                      dest=repository.image(disk["file"]), format="qcow2", force=False,
                      dirty_bitmap=started["dirty_bitmap"] if incremental else None,
                      backing=repository.image(disk["backing"]) if incremental else None,
                      backing_format=disk["backing_format"] if incremental else "qcow2",
                      connections=options["connections"], requests=COPY_REQUESTS, request_size=COPY_REQUEST_SIZE)
        dest_dir = check_params(params)
        with recorded_progress(options["state_dir"], shown_paths(params["dest"]), check_mode, warn) as progress:
            copied = copy_or_keep(params, dest_dir, options["bandwidth"], progress, check_mode, warn)
            if progress:
                progress.end(summary=copied.get("msg"))
        copies.append(dict(shown_paths(copied), disk=started["disk"]))  # paths that mean the same in any process
    run["copies"] = copies
    if not check_mode:
        renew(repository, run, options, work=work)
    return run


def stop(vm, run, check_mode):
    """End the backup; run["intact"]: whether its point-in-time view held until now."""
    _changed, _removed, run["intact"] = VmBackups(vm).stop(run["plan"]["backup_id"], False, check_mode)
    run["notes"].extend(vm.notes)
    return run


def commit(repository, run, options, check_mode):
    """Record the backup, prune, and give the lease up; run["obsolete_checkpoints"]: the checkpoints no backup needs
    any more, for forget_checkpoints()."""
    planned = run["plan"]
    if run.get("intact") is False:
        raise UserError("The point-in-time view of backup %s broke before the stop: the guest overwrote data that "
                        "the scratch space could not keep (too little room, or cbw_timeout). The guest's writes "
                        "landed; this backup is not kept." % planned["name"])
    if not check_mode:
        Lease(repository).check(run["run_id"], time.time())
    started = run["started"]
    entry = record_backup(repository, planned, started["disks"], run["copies"], started.get("libvirt"),
                          dict(consistency=started["consistency"], freeze=started["freeze"]), check_mode)
    pruned, obsolete = prune_backups(repository, options["keep_chains"], check_mode)
    run.update(recorded=entry, pruned=[b["name"] for b in pruned], obsolete_checkpoints=obsolete)
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
    """End the failed run's backup and remove the checkpoint it opened, even when it was stopped already."""
    planned = run.get("plan")
    if not planned:
        return
    VmBackups(vm).stop(planned["backup_id"], True, False)
    forget_checkpoints(vm, [planned["checkpoint"]], False)


def abort_repository(repository, run):
    """Remove what the failed run wrote, if it still holds the lease, and give the lease up; the files removed."""
    lease = Lease(repository)
    try:
        lease.check(run["run_id"], time.time())
    except UserError:
        return []  # another run holds the repository now: nothing here is ours to remove
    planned = run.get("plan") or {}
    files = {disk["file"] for disk in planned.get("disks", ())}
    files.update((lease.work(run["run_id"]) or {}).get("files", ()))  # what the copy step said it writes
    removed = repository.discard_unlisted(run["facts"]["name"], sorted(files))
    lease.release(run["run_id"])
    return removed
