#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup
short_description: Back up a QEMU VM into its repository in one task, the whole run in one process
version_added: 0.2.0
description:
  - Runs one VM's whole backup on the hypervisor, when the VM's repository is on that host (locally mounted storage,
    NFS included), in one process and one connection to the VM.
  - 'In order: the repository''s lease (one run per VM at a time, naming who holds it); O(max_age), whether a
    backup is due; for a libvirt domain that lost the newest backup''s checkpoint, the checkpoint given back from
    the repository; one listing of the disks, and the plan: full, or incremental on the newest backup; the start of
    a point-in-time view (break-snapshot fleecing, or libvirt''s pull backup), with the guest frozen when asked;
    the copy of every disk, summing checksums; the stop, which proves that the view held; the record in the
    manifest; pruning beyond O(keep_chains) and of the restore points that O(keep_last), O(keep_daily),
    O(keep_weekly) and O(keep_monthly) do not keep (consolidated away, see
    M(fleetbackup.qemu.qemu_backup_repository)); the lease given up; the removal of the checkpoints no backup needs.
    Once the backup is recorded it stays: a failure of pruning or of the checkpoints'' removal is a warning.'
  - A run that fails records nothing and removes everything it made, on the VM and in the repository, and the next
    run goes on from the last recorded backup. A run killed on the way (SIGKILL, a reboot) leaves its lease, which
    frees at once when its process is gone from this host (otherwise when it expires); the next run then ends the
    dead run's backup on the VM and removes its files.
  - With O(background_after), a run still at work after that many seconds goes on in a process of its own, and the
    module returns its RV(job); O(step=follow) then reports the copies' progress and, once the run ended, its result.
    The C(fleetbackup.qemu.qemu_backup) role shows progress lines so, only for runs that last that long.
  - With the repository on another host (a backup host that pulls the disks over NBD with TLS, O(nbd_tcp)), the run
    is split into steps, each run where it belongs and handed the RV(run) the step before returned. On the repository's host
    O(step=begin) (the lease, whether a backup is due, the new backup's name), O(step=copy) (every disk, in one
    process) and O(step=commit) (record, prune, give the lease up); on the hypervisor O(step=start) (the plan from
    one listing of the disks, and the start) and O(step=stop) (the stop; once it proved that the view held, the
    checkpoints the new backup supersedes are removed, so a record that then fails costs the next run a full
    backup). O(step=abort) undoes a failed run on the host it runs on, the VM's part where the VM is named, the
    repository's where O(repository) is.
  - Every step reports RV(summary), the run in the terms of the fleet's report.
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.vm
  - fleetbackup.qemu.repository.link
  - fleetbackup.qemu.tls
  - fleetbackup.qemu.tls.client
  - fleetbackup.qemu.repository.compress
  - fleetbackup.qemu.encryption
options:
  repository:
    description:
      - The repository, a directory with one subdirectory per VM. Needed by O(step=all), V(begin), V(copy) and
        V(commit); with O(step=abort), the repository's part is undone.
    type: path
  vm:
    description: The VM's name, its subdirectory in the repository; a plain file name. Needed with O(repository).
    type: str
  step:
    description:
      - V(all) runs the whole backup in this process. The others are the steps of a run split over two hosts (see
        above); V(follow) reports on a run that went on in the background.
    type: str
    choices: [all, begin, start, copy, stop, commit, abort, follow]
    default: all
  run:
    description: The RV(run) that the step before returned; needed by every step after V(begin).
    type: dict
  job:
    description: With O(step=follow), the RV(job) a run with O(background_after) returned.
    type: str
  wait:
    description: With O(step=follow), how many seconds to wait for the run to end before reporting its progress.
    type: float
    default: 10
  fail_if_running:
    description:
      - With O(step=follow), fail, naming the job, when the run is still at work after O(wait); the run goes on, and
        holds the lease until it ends. The role sets it for its last round of progress.
    type: bool
    default: false
  background_after:
    description:
      - With O(step=all) or O(step=copy), go on in the background after this many seconds, returning RV(job).
        V(0) never does. Not in check mode.
    type: float
    default: 0
  reason:
    description: With O(step=abort), why the run failed, for RV(summary).
    type: str
  undo:
    description:
      - With O(step=abort), what to undo on this host, V(vm) (the VM's backup and the checkpoint it opened) and
        V(repository) (the run's files, and its lease).
    type: list
    elements: str
    choices: [vm, repository]
    default: [vm, repository]
  level:
    description:
      - V(auto) continues the newest backup's chain with an incremental when it can, and says why when it cannot.
      - V(full) starts a new chain; V(incremental) fails when no incremental is possible.
    type: str
    choices: [auto, full, incremental]
    default: auto
  max_age:
    description:
      - No backup is due while the newest is younger than this (seconds, or a number with s, m, h, d or w, like
        V(20h)). V(0) backs up every run.
    type: str
    default: '0'
  keep_chains:
    description: Keep the newest this many chains and prune the older ones whole; V(0) keeps all.
    type: int
    default: 0
  keep_last:
    description:
      - Keep the newest N restore points. The points that no rule keeps are dropped after the backup is recorded,
        by consolidating, as O(fleetbackup.qemu.qemu_backup_repository#module:keep_last) says. A chain then runs for
        ever with a bounded length, and never needs a new full from the VM.
      - Consolidation merges only plain chains in this version, so the calendar rules are refused with
        O(encryption); keep encrypted chains with O(keep_chains).
      - The rules are Proxmox Backup Server's (borg's before 1.2), on UTC days. V(0) is none of a rule; with all V(0) every
        point is kept.
    type: int
    default: 0
  keep_daily:
    description: Keep the newest restore point of each of the newest N days that have one.
    type: int
    default: 0
  keep_weekly:
    description: Keep the newest restore point of each of the newest N ISO weeks that have one.
    type: int
    default: 0
  keep_monthly:
    description: Keep the newest restore point of each of the newest N months that have one.
    type: int
    default: 0
  rpo:
    description:
      - The VM's recovery-point objective, like V(24h), for RV(summary.rpo); the fleet's report flags a VM whose newest
        good backup is older.
    type: str
  disks:
    description: The disks to back up, each a qdev id, qdev path, drive id or node name; default every writable disk.
    type: list
    elements: str
  holder:
    description: Who holds the lease, as another run that finds it locked is told.
    type: str
    default: a fleetbackup run
  lock_ttl:
    description: Seconds the lease lasts beyond each step, at least 60; a dead run's lease expires so.
    type: int
    default: 600
  copy_timeout:
    description:
      - Seconds the copies of all the VM's disks may take together; the lease is held that long beyond O(lock_ttl)
        while they run. Copies still at work then are stopped, and the run fails, recording nothing.
    type: int
    default: 86400
  connections:
    description: NBD connections per disk's copy, when the export allows several; 1 to 16.
    type: int
    default: 4
  bandwidth:
    description: Bytes per second that each copy may read, or a size like V(100M); V(0) sets no limit.
    type: raw
    default: 0
  scratch_dir:
    description: As M(fleetbackup.qemu.qemu_backup_start)'s O(fleetbackup.qemu.qemu_backup_start#module:scratch_dir).
    type: path
  scratch_size:
    description: As M(fleetbackup.qemu.qemu_backup_start)'s O(fleetbackup.qemu.qemu_backup_start#module:scratch_size).
    type: str
    default: 10%
  cbw_timeout:
    description: As M(fleetbackup.qemu.qemu_backup_start)'s O(fleetbackup.qemu.qemu_backup_start#module:cbw_timeout).
    type: int
    default: 10
  fallback_to_full:
    description:
      - Back up in full a disk whose checkpoint turned out unusable at the start, rather than fail; the record says
        so.
    type: bool
    default: true
  freeze:
    description: As M(fleetbackup.qemu.qemu_backup_start)'s O(fleetbackup.qemu.qemu_backup_start#module:freeze).
    type: str
    choices: [never, always, auto]
    default: auto
  guest_agent_socket:
    description: The guest agent's socket of a QMP VM, to freeze its file systems.
    type: path
  freeze_timeout:
    description: Seconds the guest agent may take to freeze or thaw.
    type: float
    default: 10
  libvirt_small_scratch:
    description:
      - As M(fleetbackup.qemu.qemu_backup_start)'s
        O(fleetbackup.qemu.qemu_backup_start#module:libvirt_small_scratch).
    type: bool
    default: false
requirements:
  - libnbd's Python bindings (Debian package python3-libnbd)
  - the xxhash bindings, for the block checksum (Debian package python3-xxhash)
  - for O(compress=zstd), the zstandard bindings (Debian package python3-zstandard)
seealso:
  - module: fleetbackup.qemu.qemu_backup_start
  - module: fleetbackup.qemu.qemu_backup_copy
  - module: fleetbackup.qemu.qemu_backup_stop
  - module: fleetbackup.qemu.qemu_backup_repository
attributes:
  check_mode:
    support: full
    description:
      - Takes no lease and changes nothing; plans the run and reports the level and bytes it would read.
      - O(step=follow) collects a job that ended (its record is removed) in check mode too.
"""

EXAMPLES = r"""
- name: Back up a VM into a repository on its hypervisor
  fleetbackup.qemu.qemu_backup:
    qmp_socket: /run/vms/web1/qmp.sock
    repository: /backup
    vm: web1
    max_age: 20h
    keep_chains: 4

- name: Back up a libvirt domain, showing progress when the run lasts more than 10 s
  fleetbackup.qemu.qemu_backup:
    domain: db1
    repository: /backup
    vm: db1
    background_after: 10
  register: backup

- name: Follow it
  fleetbackup.qemu.qemu_backup:
    step: follow
    job: "{{ backup.job }}"
  register: followed
  until: followed.finished
  retries: 8640
  when: not backup.finished

# Ad hoc, from a shell:
#   ansible hv1 -m fleetbackup.qemu.qemu_backup -a "qmp_socket=/run/vms/web1/qmp.sock repository=/backup vm=web1"
"""

RETURN = r"""
finished:
  description: Whether the run (or the step) ended; else RV(job) goes on in the background.
  returned: always
  type: bool
  sample: true
job:
  description: The background run to follow with O(step=follow).
  returned: with step all, copy or follow, when it went on in the background or was followed
  type: str
  sample: 5f3a9c01d2e4b6a8
progress:
  description: The copies' progress in one line, as each round of O(step=follow) shows it (the last, when they ended).
  returned: when the run went on in the background
  type: str
  sample: "vda: done, 16.0 MiB in 4 s"
msg:
  description: What the run does, or why nothing is due; while a run goes on, its copies' progress.
  returned: always
  type: str
  sample: "web1: incremental backup 20261207T101500Z-3f2a of vda, expecting to read at most 20.0 MiB (...)"
summary:
  description: The run, as the fleet's report takes it.
  returned: when the run or step ended
  type: dict
  contains:
    vm:
      description: The VM's name in the repository.
      type: str
    result:
      description: C(ok), C(nothing due), C(would back up) (check mode), or C(failed).
      type: str
    backup:
      description: The backup's name.
      type: str
    level:
      description: C(full) or C(incremental).
      type: str
    bytes:
      description: Bytes read (in check mode, expected).
      type: int
    seconds:
      description: The run's duration.
      type: float
    reason:
      description: Why it failed, or why nothing was due.
      type: str
    finished:
      description: When the run ended, in seconds since the epoch.
      type: int
    newest:
      description: The VM's newest good backup after the run, C(name) and C(finished); null when there is none.
      type: dict
    rpo:
      description: O(rpo) in seconds, or null.
      type: int
    offline:
      description: Whether the VM was stopped, and its images were backed up.
      type: bool
    change:
      description:
        - For an incremental, its dirty share against the VM's own history, known before the copy. C(flagged)
          when it is more than 5 times its median and over 10% of the disks; that never fails a backup.
      type: dict
  sample: {vm: web1, result: ok, backup: 20261207T101500Z-3f2a, level: incremental, bytes: 20971520, seconds: 1.2}
backup:
  description: The manifest entry recorded, or null.
  returned: with step all or commit
  type: dict
plan:
  description: The run's plan, each disk's level, file and expected bytes; null when nothing was due.
  returned: with step all
  type: dict
copies:
  description: Each disk's copy, with C(disk), C(image), C(bytes_read), C(elapsed), C(throughput) and C(checksum).
  returned: with step all or commit
  type: list
  elements: dict
intact:
  description: Whether the point-in-time view held until the stop.
  returned: with step all or commit
  type: bool
pruned:
  description: The backups pruned.
  returned: with step all or commit
  type: list
  elements: str
consolidated:
  description:
    - The merges that dropped restore points which kept ones needed, as
      RV(fleetbackup.qemu.qemu_backup_repository#module:consolidated) describes them.
  returned: with step all or commit
  type: list
  elements: dict
removed_checkpoints:
  description: The checkpoints no backup needs any more, removed from the VM.
  returned: with step all or commit
  type: list
  elements: str
run:
  description: The run's state, for the next step.
  returned: with the steps begin to abort
  type: dict
discarded:
  description: With O(step=abort), the files of the failed run removed from the repository.
  returned: with step abort
  type: list
  elements: str
notes:
  description: What the run noted, also shown as warnings.
  returned: when the run or step ended
  type: list
  elements: str
"""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import (
    COMPRESS_ARGUMENT_SPEC,
    ENCRYPTION_ARGUMENT_SPEC,
    LINK_ARGUMENT_SPEC,
    NBD_TCP_ARGUMENT_SPEC,
    TLS_CLIENT_ARGUMENT_SPEC,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._run.module_steps import run_step
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.module import VmModule


def main():
    module = VmModule(
        argument_spec=dict(
            repository=dict(type="path"),
            vm=dict(type="str"),
            **LINK_ARGUMENT_SPEC,
            step=dict(type="str", choices=["all", "begin", "start", "copy", "stop", "commit", "abort", "follow"],
                      default="all"),
            run=dict(type="dict"),
            job=dict(type="str"),
            wait=dict(type="float", default=10),
            fail_if_running=dict(type="bool", default=False),
            background_after=dict(type="float", default=0),
            reason=dict(type="str"),
            undo=dict(type="list", elements="str", choices=["vm", "repository"], default=["vm", "repository"]),
            level=dict(type="str", choices=["auto", "full", "incremental"], default="auto"),
            max_age=dict(type="str", default="0"),
            keep_chains=dict(type="int", default=0),
            keep_last=dict(type="int", default=0),
            keep_daily=dict(type="int", default=0),
            keep_weekly=dict(type="int", default=0),
            keep_monthly=dict(type="int", default=0),
            rpo=dict(type="str"),
            disks=dict(type="list", elements="str"),
            holder=dict(type="str", default="a fleetbackup run"),
            lock_ttl=dict(type="int", default=600),
            copy_timeout=dict(type="int", default=86400),
            connections=dict(type="int", default=4),
            bandwidth=dict(type="raw", default=0),
            **COMPRESS_ARGUMENT_SPEC,
            scratch_dir=dict(type="path"),
            scratch_size=dict(type="str", default="10%"),
            cbw_timeout=dict(type="int", default=10),
            fallback_to_full=dict(type="bool", default=True),
            freeze=dict(type="str", choices=["never", "always", "auto"], default="auto"),
            guest_agent_socket=dict(type="path"),
            freeze_timeout=dict(type="float", default=10),
            libvirt_small_scratch=dict(type="bool", default=False),
            **NBD_TCP_ARGUMENT_SPEC,
            **TLS_CLIENT_ARGUMENT_SPEC,
            **ENCRYPTION_ARGUMENT_SPEC,
        ),
        mutually_exclusive=[("domain", "guest_agent_socket")],
        required_together=[("repository", "vm")],
        vm_required=False,
        needs_nbd=True,
        needs_checksums=True,
        supports_check_mode=True,
    )
    module.run(run_step)


if __name__ == "__main__":
    main()
