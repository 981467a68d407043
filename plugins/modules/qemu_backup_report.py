#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_report
short_description: Write a fleet run's report, and its Prometheus metrics
version_added: 0.1.0
description:
  - 'Runs on the controller at the end of a fleet run (C(hosts: localhost)), given every VM''s run summary (the
    C(qemu_backup_summary) fact that the backup role sets). It is an action: the controller''s own process does the
    work, whatever host the task names, with no module process to start. It writes the run''s report as JSON into O(report_dir),
    as C(<UTC time>.json) and as C(latest.json), and optionally metrics for node_exporter''s textfile collector into
    O(metrics_dir).'
  - Per VM, the report has the run's result, level, bytes, seconds and the reason of a failure; the VM's newest good
    backup and its age; its recovery-point objective (RPO) and whether it is breached (the newest good backup is
    older than the RPO, there is none, or the VM was not reached); and the change-rate flag, a dirty share far above
    the VM's own median, as mass encryption by ransomware would cause. RV(report.attention) lists the VMs that
    failed, were not reached, breached their RPO or were flagged.
  - The previous C(latest.json) carries what one run cannot know. A VM that it lists and this run does not mention
    (its hypervisor was not reached, so the VM was not found) stays in the report as C(unreached) with its newest
    backup, so that its RPO breach shows; the failures counter goes on across runs. O(forget) drops VMs that left
    the fleet.
  - The previous report is read only from a file that this module made, in a directory of its own. A O(report_dir)
    that another user owns or that group or others can enter, or a C(latest.json) that is a symbolic link or not
    ours, fails the task, naming the path, and nothing is written.
  - It never fails for the VMs' results; a failed VM fails its own host's task in the fleet playbooks.
author:
  - fleetbackup.qemu developers (@fleetbackup)
options:
  summaries:
    description:
      - Every VM's run summary, as the C(qemu_backup_summary) fact of the backup role holds it; C(vm) and C(result)
        (C(ok), C(nothing due), C(failed) or C(unreached)) are required, the other keys read when present (C(level),
        C(backup), C(bytes), C(seconds), C(reason), C(finished), C(newest), C(rpo), C(change), C(hypervisor)).
      - 'A VM whose host has no summary is given as C({vm, result: unreached, reason}); the
        P(fleetbackup.qemu.run_summary#filter) filter makes either from a host''s variables.'
    type: list
    elements: dict
    required: true
  report_dir:
    description:
      - The directory of the reports, on the controller. Created with mode 0700 if missing; it must be owned by
        this user, and group and others may have no access to it.
    type: path
    default: ~/.local/state/fleetbackup/reports
  metrics_dir:
    description:
      - node_exporter's textfile-collector directory (its C(--collector.textfile.directory); Debian's is
        C(/var/lib/prometheus/node-exporter)). The module writes C(fleetbackup.prom) there atomically, mode 0644, for
        node_exporter, which runs as another user, to read.
      - It must exist, and be owned by root or this user and not writable by others; a symbolic link is refused.
      - Not given, no metrics are written.
    type: path
  rpo:
    description:
      - The recovery-point objective of the VMs whose summary has none (their C(qemu_backup_rpo)), as seconds or a
        duration like C(24h), C(30m), C(7d).
      - Not given, such VMs have no RPO, and none is breached.
    type: str
  keep_reports:
    description: How many run reports to keep, the newest; C(latest.json) always stays.
    type: int
    default: 168
  forget:
    description: VMs of the previous report not to carry over into this one, such as VMs removed from the fleet.
    type: list
    elements: str
    default: []
attributes:
  action:
    support: full
    description: An action plugin does the work, in the controller's process.
  check_mode:
    support: full
    description: In check mode it builds the report on the previous one and returns it, writing nothing.
notes:
  - The metrics are in the Prometheus text format 0.0.4, one sample per VM labelled C(vm) -
    C(fleetbackup_last_success_timestamp_seconds), C(fleetbackup_last_run_timestamp_seconds),
    C(fleetbackup_last_run_duration_seconds), C(fleetbackup_last_run_bytes), C(fleetbackup_last_run_success),
    C(fleetbackup_failures_total), C(fleetbackup_rpo_seconds), C(fleetbackup_rpo_breached),
    C(fleetbackup_change_share), C(fleetbackup_change_flagged); and C(fleetbackup_report_timestamp_seconds).
    An unknown value (no good backup yet, no RPO, no change measured) has no sample.
"""

EXAMPLES = r"""
- name: Report the fleet's run, with metrics for node_exporter
  fleetbackup.qemu.qemu_backup_report:
    summaries: "{{ groups['fleetbackup_vms'] | map('extract', hostvars) | map('fleetbackup.qemu.run_summary') | list }}"
    metrics_dir: /var/lib/prometheus/node-exporter
    rpo: 24h
  register: report

- name: Show who needs attention
  ansible.builtin.debug:
    msg: "{{ report.report.attention }}"

- name: Report two VMs by hand
  fleetbackup.qemu.qemu_backup_report:
    summaries:
      - {vm: web1, result: ok, level: incremental, bytes: 1048576, seconds: 1.2, finished: 1765121400,
         newest: {name: 20261207T153000Z-1a2b, finished: 1765121400}, rpo: 86400}
      - {vm: db1, result: unreached, reason: its hypervisor was unreachable}
    report_dir: /var/lib/fleetbackup-reports
"""

RETURN = r"""
report:
  description: The run's report, as written to RV(report_file) and C(latest.json).
  returned: always
  type: dict
  contains:
    format:
      description: The report's layout, 1.
      type: int
    name:
      description: The run's name, its UTC time like C(20261207T153000Z), the name of its file without C(.json).
      type: str
    time:
      description: When the report was made, in seconds since the epoch.
      type: int
    time_utc:
      description: The same, for a person.
      type: str
    previous:
      description: The name of the report it was built on, or null for none.
      type: str
    totals:
      description:
        - Counts of VMs (C(vms), C(ok), C(nothing_due), C(failed), C(unreached), C(rpo_breached), C(change_flagged),
          C(attention)), and the C(bytes) and C(seconds) of all runs added up (they ran side by side, so the seconds
          add up to more than the run's time).
      type: dict
    attention:
      description: The VMs that failed, were not reached, breached their RPO or were flagged, each with its lines.
      type: list
      elements: dict
      contains:
        vm:
          description: The VM.
          type: str
        problems:
          description: 'One line per problem, like C(RPO 24h breached: the newest backup, 20261206T010000Z-9f3c, is
            38h old).'
          type: list
          elements: str
    vms:
      description: Every VM, by name.
      type: list
      elements: dict
      contains:
        vm:
          description: The VM's name.
          type: str
        hypervisor:
          description: Its hypervisor, when the fleet playbook named one.
          type: str
        result:
          description: C(ok), C(nothing due), C(failed) or C(unreached).
          type: str
        backup:
          description: The backup this run made or tried, or null.
          type: str
        level:
          description: C(full), C(incremental), or null.
          type: str
        bytes:
          description: Bytes this run read.
          type: int
        seconds:
          description: How long this run took; null when unknown.
          type: float
        reason:
          description: Why it failed, was not reached, or had nothing due; null otherwise.
          type: str
        finished:
          description: When this run ended, in seconds since the epoch; the report's time for a VM not reached.
          type: int
        newest:
          description: The newest good backup, C({name, finished, age_seconds}), or null when none is known.
          type: dict
        rpo_seconds:
          description: The VM's RPO, or null for none.
          type: int
        rpo_source:
          description: C(vm) (its own C(qemu_backup_rpo)) or C(default) (O(rpo)); null without an RPO.
          type: str
        rpo_breached:
          description: Whether the newest good backup is older than the RPO, there is none, or the VM was not
            reached; false without an RPO.
          type: bool
        change:
          description: The change-rate signal of an incremental, C({dirty_bytes, disk_bytes, share, median_share,
            samples, flagged, note}); null for a full backup or none.
          type: dict
        change_flagged:
          description: Whether the change rate was flagged.
          type: bool
        failures_total:
          description: Runs that failed or did not reach the VM, counted across reports.
          type: int
        carried_over:
          description: Whether the VM came from the previous report only, not mentioned by this run.
          type: bool
report_file:
  description: This run's report; null in check mode.
  returned: always
  type: str
latest_file:
  description: C(latest.json), now this run's report; null in check mode.
  returned: always
  type: str
metrics_file:
  description: The metrics written for node_exporter; null without O(metrics_dir), and in check mode.
  returned: always
  type: str
pruned:
  description: The names of the run reports removed beyond O(keep_reports).
  returned: always
  type: list
  elements: str
msg:
  description: 'One line, like C(8 VMs: 6 ok, 1 nothing due, 1 unreached; attention: db1 ...).'
  returned: always
  type: str
"""
