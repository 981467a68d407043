#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_repository
short_description: Plan, record and prune the backups in a VM's backup repository
version_added: 0.1.0
description:
  - A repository directory per VM holds its backup images and a manifest, C(manifest.json), of the complete
    backups. The manifest is replaced atomically and only ever lists backups whose copies all finished.
  - O(action=plan) decides what a run does, from the manifest and the VM's disks and checkpoints as
    M(fleetbackup.qemu.qemu_backup_info) returns them. It never changes anything.
  - O(action=record) appends a complete backup. O(action=prune) deletes whole old chains, images and entries.
  - The M(fleetbackup.qemu.backup) role chains this module with the backup modules; use the role.
author:
  - fleetbackup.qemu developers
options:
  path:
    description: The VM's repository directory, C(<repository>/<vm>).
    type: path
    required: true
  action:
    description: What to do.
    type: str
    choices: [plan, record, prune]
    required: true
  vm:
    description: The VM's name, recorded in the manifest and used in backup ids.
    type: str
    required: true
  level:
    description:
      - With O(action=plan), C(full), C(incremental), or C(auto), which takes a full backup when there is no complete
        chain or its last checkpoint cannot be used on the VM (missing, inconsistent, disk resized or disks changed),
        and an incremental otherwise.
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
    description: With O(action=record), the RV(plan) of this run.
    type: dict
  started_disks:
    description: With O(action=record), RV(fleetbackup.qemu.qemu_backup_start#module:backup.disks) of this run.
    type: list
    elements: dict
  copies:
    description:
      - With O(action=record), C({disk, bytes_read}) for every disk copied, or the registered results of a loop of
        M(fleetbackup.qemu.qemu_backup_copy) over RV(fleetbackup.qemu.qemu_backup_start#module:backup.disks).
    type: list
    elements: dict
  keep_chains:
    description: With O(action=prune), how many of the newest chains to keep. C(0) keeps all.
    type: int
    default: 0
attributes:
  check_mode:
    support: full
    description: O(action=plan) runs as usual; record and prune report what they would change.
"""

EXAMPLES = r"""
- name: What is due?
  fleetbackup.qemu.qemu_backup_repository:
    path: /backup/web1
    vm: web1
    action: plan
    max_age: 12h
    vm_disks: "{{ info.disks }}"
  register: plan

- name: Keep the two newest chains
  fleetbackup.qemu.qemu_backup_repository:
    path: /backup/web1
    vm: web1
    action: prune
    keep_chains: 2
"""

RETURN = r"""
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
      description: The new backup's name, a UTC time.
      type: str
      sample: 20261129T020000Z
    level:
      description: C(full) or C(incremental).
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
        - Per disk, C(disk), C(size), image C(file) and C(backing) (relative to the repository), C(expected_bytes).
      type: list
      elements: dict
    expected_bytes:
      description:
        - Bytes the copies are expected to read at most (dirty bytes for an incremental, disk sizes for a full).
      type: int
backup:
  description: With O(action=record), the manifest entry.
  returned: action is record
  type: dict
pruned:
  description: With O(action=prune), names of the backups removed.
  returned: action is prune
  type: list
  elements: str
obsolete_checkpoints:
  description:
    - With O(action=prune), checkpoints the VM no longer needs (all but the newest backup's); the role removes them.
  returned: action is prune
  type: list
  elements: str
"""

import os
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils.repository import (
    Repository,
    obsolete_checkpoints,
    parse_duration,
    plan,
    prune,
    record,
)


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            action=dict(type="str", choices=["plan", "record", "prune"], required=True),
            vm=dict(type="str", required=True),
            level=dict(type="str", choices=["auto", "full", "incremental"], default="auto"),
            max_age=dict(type="str", default="0"),
            vm_disks=dict(type="list", elements="dict"),
            disks=dict(type="list", elements="str"),
            planned=dict(type="dict"),
            started_disks=dict(type="list", elements="dict"),
            copies=dict(type="list", elements="dict"),
            keep_chains=dict(type="int", default=0),
        ),
        required_if=[("action", "plan", ["vm_disks"]),
                     ("action", "record", ["planned", "started_disks", "copies"])],
        supports_check_mode=True,
    )
    module.run(ACTIONS[module.params["action"]])


def plan_action(module):
    params = module.params
    repository = Repository(params["path"])
    planned = plan(repository.load(params["vm"]), params["vm"], params["level"], parse_duration(params["max_age"]),
                   params["vm_disks"], params["disks"], int(time.time()))
    return dict(changed=False, plan=planned)


def record_action(module):
    params = module.params
    repository = Repository(params["path"])
    data = repository.load(params["vm"])
    entry = record(data, params["planned"], params["started_disks"], params["copies"], int(time.time()))
    if not module.check_mode:
        repository.save(data)
    return dict(changed=True, backup=entry)


def prune_action(module):
    params = module.params
    repository = Repository(params["path"])
    data = repository.load(params["vm"])
    pruned, files = prune(data, params["keep_chains"])
    if pruned and not module.check_mode:
        # The manifest goes first: a run killed half-way leaves unlisted files, never listed missing ones.
        repository.save(data)
        for file_name in files:
            try:
                os.unlink(repository.image(file_name))
            except FileNotFoundError:
                pass
    return dict(changed=bool(pruned), pruned=[b["name"] for b in pruned],
                obsolete_checkpoints=obsolete_checkpoints(data, pruned))


ACTIONS = dict(plan=plan_action, record=record_action, prune=prune_action)


if __name__ == "__main__":
    main()
