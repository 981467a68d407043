#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_repository
short_description: Lock, plan, record, prune and consolidate the backups in a VM's backup repository
version_added: 0.1.0
description:
  - A repository directory per VM, C(<repository>/<vm>), holds its backup images and a manifest, C(manifest.json), of
    the complete backups. The manifest is replaced atomically and only ever lists backups whose copies all finished.
  - O(action=lock) takes the repository's lease for a run, or renews it. One run at a time works on a VM's
    repository, even when its steps run on several hosts; a second run fails at once, naming the one that holds
    the lease. The lease expires after O(lock_ttl) seconds unless renewed, so a run that was killed frees it.
    O(action=unlock) gives it up.
  - O(action=plan) decides what a run does, from the manifest and the VM's disks and checkpoints as
    M(fleetbackup.qemu.qemu_backup_info) returns them. It never changes anything.
  - O(action=record) appends a complete backup. O(action=prune) deletes whole old chains beyond O(keep_chains), and
    the restore points that the calendar rules (O(keep_last), O(keep_daily), O(keep_weekly), O(keep_monthly)) do not
    keep, consolidating where a kept point needs them.
  - O(action=consolidate) is O(action=prune) by the name of what it does to chains. It drops restore points, those
    named in O(drop) and those the calendar rules do not keep, with no VM involved. A kept point whose chain needs a
    dropped one is rewritten. The oldest kept point of a chain becomes a new full (a synthetic full, its whole view
    merged), and a kept point after a dropped one becomes an overlay of the kept point before it, holding the
    clusters of the points between. The new image keeps the file name, so the later incrementals still read it, and
    stays plain qcow2 that qemu-img and QEMU read; its checksum is summed anew as it is written. Every remaining
    point restores the same bytes as before. A run killed at any moment leaves a repository that restores and
    verifies, and the next run that takes the lease finishes or undoes the merge (the manifest's C(consolidation)
    journal). The newest backup is never dropped, since the next incremental continues from it. The checkpoints on
    the VM are not touched; RV(obsolete_checkpoints) names those no backup needs.
  - O(action=discard) deletes the images a failed run wrote, and only those the manifest does not list.
    Record, prune, consolidate and discard need the lease (O(run_id)), which they hold throughout.
  - O(action=lock) finishes or undoes a merge that a killed run left.
  - O(action=newest) returns the newest complete backup's manifest entry, and changes nothing.
  - Every name that comes from the manifest or the inventory (VM, disk, image file) must be a plain file name inside
    the VM's directory, or nothing is touched.
  - The C(fleetbackup.qemu.qemu_backup) role chains this module with the backup modules; use the role.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.repository
  - fleetbackup.qemu.repository.link
options:
  action:
    description: What to do.
    type: str
    choices: [lock, unlock, plan, record, prune, consolidate, discard, newest]
    required: true
  run_id:
    description:
      - The run that holds (or takes) the lease. O(action=lock) makes one up when it is not given, and returns it.
      - Required by unlock, record, prune, consolidate and discard.
    type: str
  holder:
    description: With O(action=lock), who the run is, for the message another run gets while this one holds the lease.
    type: str
    default: a fleetbackup run
  lock_ttl:
    description: With O(action=lock), seconds until the lease expires unless the run renews it.
    type: int
    default: 3600
  level:
    description:
      - With O(action=plan), C(full), C(incremental), or C(auto), which takes a full backup when there is no complete
        chain, its last checkpoint cannot be used on the VM (missing, inconsistent, disk resized or disks changed),
        or an image the chain needs is missing from the repository; and an incremental otherwise.
    type: str
    choices: [auto, full, incremental]
    default: auto
  max_age:
    description:
      - With O(action=plan), a run is not due while the newest complete backup is younger than this.
        Seconds, or a number with C(s), C(m), C(h), C(d) or C(w). C(0) makes every run due.
    type: str
    default: '0'
  vm_disks:
    description: With O(action=plan), RV(fleetbackup.qemu.qemu_backup_info#module:disks).
    type: list
    elements: dict
  disks:
    description: With O(action=plan), the disks to back up; default every writable disk.
    type: list
    elements: str
  planned:
    description: With O(action=record) or O(action=discard), the RV(plan) of this run.
    type: dict
  started_disks:
    description:
      - With O(action=record), RV(fleetbackup.qemu.qemu_backup_start#module:backup.disks) of this run.
      - Each disk is recorded at the level the plan gave it, or in full where the start backed it up in full
        (O(fleetbackup.qemu.qemu_backup_start#module:fallback_to_full)).
    type: list
    elements: dict
  copies:
    description:
      - With O(action=record), the copy of each disk of O(started_disks), in the same order, as
        C({bytes_read, checksum}) or as the result of M(fleetbackup.qemu.qemu_backup_copy) (as C(async_status)
        returns it, too). A copy is of the disk it names (its C(disk), or its
        RV(fleetbackup.qemu.qemu_backup_copy#module:image), the planned file in the repository), else of the started
        disk at its place in the list (the role's copies loop over the start's disks, so their results come in that
        order).
      - Each disk's RV(fleetbackup.qemu.qemu_backup_copy#module:checksum) is recorded in the manifest for
        M(fleetbackup.qemu.qemu_backup_verify).
    type: list
    elements: dict
  keep_chains:
    description: With O(action=prune) or O(action=consolidate), how many of the newest chains to keep. C(0) keeps all.
    type: int
    default: 0
  keep_last:
    description:
      - With O(action=prune) or O(action=consolidate), keep the newest N restore points.
      - The calendar rules are Proxmox Backup Server's (borg's before 1.2, which since also keeps the oldest when a
        rule's count is not reached). Each keeps the newest backup of each of its newest N periods that hold a backup no
        earlier rule kept (days without backups do not count), in the order O(keep_last), O(keep_daily), O(keep_weekly)
        (ISO weeks), O(keep_monthly). A point any rule keeps is kept; the newest always is. Periods are UTC days, weeks
        and months of the backups' finish times.
      - With every rule C(0), the calendar keeps every point.
    type: int
    default: 0
  keep_daily:
    description:
      - With O(action=prune) or O(action=consolidate), keep the newest backup of each of the newest N days that have
        one.
    type: int
    default: 0
  keep_weekly:
    description:
      - With O(action=prune) or O(action=consolidate), keep the newest backup of each of the newest N ISO weeks that
        have one.
    type: int
    default: 0
  keep_monthly:
    description:
      - With O(action=prune) or O(action=consolidate), keep the newest backup of each of the newest N months that
        have one.
    type: int
    default: 0
  drop:
    description:
      - With O(action=prune) or O(action=consolidate), names of backups to drop besides those the rules do not keep.
        The newest cannot be.
    type: list
    elements: str
  definition:
    description:
      - With O(action=record), for a libvirt domain, RV(fleetbackup.qemu.qemu_backup_start#module:backup.libvirt) of
        this run. The domain's XML and its UEFI variables (NVRAM) are stored beside the images as
        C(<name>.domain.xml) and C(<name>.nvram); the checkpoint's XML goes in the manifest, for a checkpoint that
        libvirt loses to be given back.
    type: dict
  consistency:
    description:
      - With O(action=record), RV(fleetbackup.qemu.qemu_backup_start#module:backup.consistency) of this run,
        C(application) or C(crash); the manifest entry keeps it.
    type: str
    choices: [application, crash]
  freeze:
    description:
      - With O(action=record), RV(fleetbackup.qemu.qemu_backup_start#module:backup.freeze) of this run (how long the
        guest's file systems were frozen, how many, or why they were not); the manifest entry keeps it.
    type: dict
attributes:
  check_mode:
    support: full
    description:
      - O(action=plan) runs as usual; the other actions report what they would change and change nothing.
      - O(action=prune) and O(action=consolidate) list the backups they would drop, and the images they would rewrite
        with the bytes they would write at most (RV(consolidated)).
"""

EXAMPLES = r"""
- name: Take the lease of web1's repository for this run
  fleetbackup.qemu.qemu_backup_repository:
    repository: /backup
    vm: web1
    action: lock
    holder: "nightly play on {{ inventory_hostname }}"
  register: lease

- name: What is due?
  fleetbackup.qemu.qemu_backup_repository:
    repository: /backup
    vm: web1
    action: plan
    max_age: 12h
    vm_disks: "{{ info.disks }}"
  register: plan

- name: Keep the two newest chains
  fleetbackup.qemu.qemu_backup_repository:
    repository: /backup
    vm: web1
    action: prune
    keep_chains: 2
    run_id: "{{ lease.lease.run_id }}"

- name: Keep 7 daily, 4 weekly and 6 monthly restore points of web1's chain, consolidating the others away
  fleetbackup.qemu.qemu_backup_repository:
    repository: /backup
    vm: web1
    action: consolidate
    keep_daily: 7
    keep_weekly: 4
    keep_monthly: 6
    run_id: "{{ lease.lease.run_id }}"
  register: consolidation

- name: Drop one restore point by name (the chain is merged around it)
  fleetbackup.qemu.qemu_backup_repository:
    repository: /backup
    vm: web1
    action: consolidate
    drop: [20261129T020000Z-3f2a]
    run_id: "{{ lease.lease.run_id }}"
"""

RETURN = r"""
directory:
  description:
    - The VM's directory in the repository, where it really is (after a symbolic link the module was let to follow).
  returned: always
  type: str
  sample: /backup/web1
lease:
  description: With O(action=lock), the lease this run holds now.
  returned: action is lock
  type: dict
  contains:
    run_id:
      description: The run's id; pass it to the later actions of the run.
      type: str
    holder:
      description: Who the run is.
      type: str
    host:
      description: The host the lease was taken on.
      type: str
    taken:
      description: When the run first took the lease, in seconds since the epoch.
      type: int
    expires:
      description: When the lease expires unless renewed, in seconds since the epoch.
      type: int
    taken_over:
      description: The expired lease of a run that had died, which this run took over; else null.
      type: dict
plan:
  description: With O(action=plan), what the run will do.
  returned: action is plan
  type: dict
  contains:
    due:
      description: Whether a backup is due; when false, nothing else is set but RV(plan.reason).
      type: bool
    reason:
      description: Why this level, or why nothing is due.
      type: str
    name:
      description: The new backup's name, a UTC time and a random part.
      type: str
      sample: 20261129T020000Z-3f2a
    level:
      description: C(full) or C(incremental), which it is when any of its disks is.
      type: str
    backup_id:
      description: The backup_id for M(fleetbackup.qemu.qemu_backup_start).
      type: str
    checkpoint:
      description: The checkpoint this backup opens.
      type: str
    incremental:
      description: The checkpoint this backup is incremental to, or null.
      type: str
    parent:
      description: The backup this one is an overlay of, or null.
      type: str
    chain:
      description: The name of the full backup that starts this backup's chain.
      type: str
    disks:
      description:
        - Per disk, C(disk), C(size), image C(file), C(mode) (C(full) or C(incremental)), C(backing) and
          C(backing_format) (the parent's image, relative to the VM's directory, for an incremental disk),
          C(expected_bytes), and C(reason) when a disk of an incremental is backed up in full (a raw disk).
      type: list
      elements: dict
    expected_bytes:
      description:
        - Bytes the copies are expected to read at most (dirty bytes for an incremental, disk sizes for a full).
      type: int
backup:
  description:
    - With O(action=record), the manifest entry; with O(action=newest), the newest backup's, or null when there is none.
    - An entry has C(consistency), C(application) or C(crash) (null for backups recorded before it was kept), and
      C(freeze), with C(seconds) the guest's file systems were frozen, C(filesystems) and the C(reason) for a
      crash-consistent backup.
    - A libvirt domain's entry has C(definition) with the C(domain_xml) file, the C(checkpoint_xml), the C(nvram)
      (C(file), the domain's C(path), C(sha256)) and C(not_backed_up), what the backup could not keep (a vTPM).
  returned: action is record or newest
  type: dict
pruned:
  description: With O(action=prune) or O(action=consolidate), names of the backups removed (in check mode, to remove).
  returned: action is prune or consolidate
  type: list
  elements: str
consolidated:
  description:
    - With O(action=prune) or O(action=consolidate), the merges that dropped the backups, oldest first.
  returned: action is prune or consolidate
  type: list
  elements: dict
  contains:
    target:
      description: The kept backup whose images were rewritten; null when the dropped backups were removed whole.
      type: str
    onto:
      description: The kept backup the target is an overlay of now; null when it became its chain's full.
      type: str
    drop:
      description: The backups it dropped.
      type: list
      elements: str
    rewrites:
      description:
        - Per rewritten image, C(disk), C(file), C(size), C(layers) (the images, newest first, that it was made of),
          C(backing) (its new backing image, or null for a full), C(bytes_read) and C(bytes_written) (what the new
          image takes on disk).
      type: list
      elements: dict
    bytes_to_write:
      description: In check mode, what the new images would take at most (what their layers take now).
      type: int
    seconds:
      description: How long the merge took.
      type: float
discarded:
  description: With O(action=discard), the images deleted.
  returned: action is discard
  type: list
  elements: str
obsolete_checkpoints:
  description:
    - With O(action=prune) or O(action=consolidate), checkpoints the VM no longer needs (all but the newest backup's);
      the role removes them.
  returned: action is prune or consolidate
  type: list
  elements: str
"""

import secrets
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.consolidation import resume
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.recording import prune_backups, record_backup
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.retention import CALENDAR_RULES
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.lease import Lease, check_ttl
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import parse_duration, plan
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import REPOSITORY_ARGUMENT_SPEC
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            **REPOSITORY_ARGUMENT_SPEC,
            action=dict(type="str", choices=list(ACTIONS), required=True),
            run_id=dict(type="str"),
            holder=dict(type="str", default="a fleetbackup run"),
            lock_ttl=dict(type="int", default=3600),
            level=dict(type="str", choices=["auto", "full", "incremental"], default="auto"),
            max_age=dict(type="str", default="0"),
            vm_disks=dict(type="list", elements="dict"),
            disks=dict(type="list", elements="str"),
            planned=dict(type="dict"),
            started_disks=dict(type="list", elements="dict"),
            copies=dict(type="list", elements="dict"),
            keep_chains=dict(type="int", default=0),
            **{rule: dict(type="int", default=0) for rule in CALENDAR_RULES},
            drop=dict(type="list", elements="str"),
            definition=dict(type="dict"),
            consistency=dict(type="str", choices=["application", "crash"]),
            freeze=dict(type="dict"),
        ),
        required_if=[("action", "plan", ["vm_disks"]),
                     ("action", "record", ["planned", "started_disks", "copies", "run_id"]),
                     ("action", "discard", ["planned", "run_id"]),
                     ("action", "prune", ["run_id"]), ("action", "consolidate", ["run_id"]),
                     ("action", "unlock", ["run_id"])],
        supports_check_mode=True,
    )
    module.run(run_action)


def run_action(module):
    """The action's result, with the repository's real path (after any link the user let us follow)."""
    params = module.params
    action = params["action"]
    if action == "lock":
        check_ttl(params["lock_ttl"])
    with Repository(params["repository"], params["vm"], params["follow_repository_link"],
                    create=action == "lock" and not module.check_mode, missing_ok=True) as repository:
        return dict(ACTIONS[action](module, repository), directory=repository.path)


def held_lease(module, repository):
    """The lease, after checking that this run still holds it."""
    lease = Lease(repository)
    lease.check(module.params["run_id"], time.time())
    return lease


def lease_keeper(module, repository, run_id=None):
    """What renews this run's lease for lock_ttl more seconds, or fails once the run lost it."""
    lease = Lease(repository)
    return lambda: lease.renew(run_id or module.params["run_id"], module.params["lock_ttl"], time.time())


def lock_action(module, repository):
    params = module.params
    run_id = params["run_id"] or secrets.token_hex(8)
    if module.check_mode:
        return dict(changed=False, lease=dict(run_id=run_id, holder=params["holder"]))
    lease = Lease(repository).take(run_id, params["holder"], params["lock_ttl"], int(time.time()))
    try:
        resume(repository, lease_keeper(module, repository, run_id))
    except BaseException:
        if not params["run_id"]:  # a lease made up here, whose run_id the caller never gets: not to be left held
            Lease(repository).release(run_id)
        raise
    return dict(changed=True, lease=lease)


def unlock_action(module, repository):
    if module.check_mode or not repository.exists():
        return dict(changed=False)
    return dict(changed=Lease(repository).release(module.params["run_id"]))


def plan_action(module, repository):
    params = module.params
    planned = plan(repository, repository.load(), params["level"], parse_duration(params["max_age"]),
                   params["vm_disks"], params["disks"], int(time.time()))
    return dict(changed=False, plan=planned)


def record_action(module, repository):
    params = module.params
    held_lease(module, repository)
    entry = record_backup(repository, params["planned"], params["started_disks"], params["copies"],
                          params["definition"], dict(consistency=params["consistency"], freeze=params["freeze"]),
                          module.check_mode)
    return dict(changed=True, backup=entry)


def newest_action(module, repository):
    backups = repository.load()["backups"] if repository.exists() else []
    return dict(changed=False, backup=backups[-1] if backups else None)


def prune_action(module, repository):
    """prune and consolidate: drop what the retention options do not keep, merging where a kept point needs it."""
    params = module.params
    held_lease(module, repository)
    retention = {key: params[key] for key in ("keep_chains", "drop") + CALENDAR_RULES}
    pruned, merged, obsolete = prune_backups(repository, retention, lease_keeper(module, repository),
                                             module.check_mode)
    return dict(changed=bool(pruned), pruned=[b["name"] for b in pruned], consolidated=merged,
                obsolete_checkpoints=obsolete)


def discard_action(module, repository):
    held_lease(module, repository)
    planned = module.params["planned"]
    discarded = repository.discard_unlisted(planned["name"], [disk["file"] for disk in planned["disks"]],
                                            module.check_mode)
    return dict(changed=bool(discarded), discarded=discarded)


ACTIONS = dict(lock=lock_action, unlock=unlock_action, plan=plan_action, record=record_action, prune=prune_action,
               consolidate=prune_action, discard=discard_action, newest=newest_action)


if __name__ == "__main__":
    main()
