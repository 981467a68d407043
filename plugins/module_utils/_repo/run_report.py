# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A fleet run's report, built from each VM's run summary and the previous report: what every VM's run did, how
old its newest good backup is against its recovery-point objective (RPO), its change-rate flag, and the VMs that
need attention.

The previous report carries what one run cannot know: a VM that this run did not mention (its hypervisor was not
reached, so it was not even found) stays in the report as unreached with its newest backup, and the failures
counter goes on across runs. Pure: no files, no clock.
"""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import parse_duration

# The report's layout; a previous report of another is not built upon.
FORMAT = 1
OK, NOTHING_DUE, FAILED, UNREACHED = "ok", "nothing due", "failed", "unreached"
# A check-mode run's prediction: it would take a backup.
WOULD_BACK_UP = "would back up"
RESULTS = (OK, NOTHING_DUE, WOULD_BACK_UP, FAILED, UNREACHED)
# Results that count as a failure of the VM's run (fleetbackup_failures_total).
FAILURES = (FAILED, UNREACHED)
NOT_MENTIONED = ("not in this run: its hypervisor was not reached, so the VM was not found (carried over from "
                 "report %s)")
RUN_NAME_FORMAT = "%Y%m%dT%H%M%SZ"


def run_name(now):
    """The name of a run's report, its UTC time: 20261207T153000Z."""
    return time.strftime(RUN_NAME_FORMAT, time.gmtime(now))


def rpo_seconds(value, vm):
    """A recovery-point objective in seconds, from seconds or a duration like 24h; None for none."""
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    try:
        return parse_duration(value)
    except UserError as err:
        raise UserError("The RPO of %s: %s" % (vm, err)) from None


def human_duration(seconds):
    """30s, 45m, 30h, 3d 4h: the two largest units, for lines a person reads."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm" % (seconds // 60)
    if seconds < 2 * 86400:
        return "%dh" % (seconds // 3600) + ("" if seconds % 3600 < 60 else " %dm" % (seconds % 3600 // 60))
    return "%dd" % (seconds // 86400) + ("" if seconds % 86400 < 3600 else " %dh" % (seconds % 86400 // 3600))


def previous_entries(previous, where):
    """The previous report's VMs by name (none without a report); a file of another shape is refused."""
    if previous is None:
        return {}
    vms = previous.get("vms") if isinstance(previous, dict) else None
    if (not isinstance(previous, dict) or previous.get("format") != FORMAT or not isinstance(vms, list)
            or not all(isinstance(entry, dict) and isinstance(entry.get("vm"), str) for entry in vms)):
        raise UserError("%s is not a run report of this version of fleetbackup (format %d): move it away after "
                        "checking what it is; the next run then starts the failure counters afresh." % (where, FORMAT))
    return {entry["vm"]: entry for entry in vms}


def vm_entry(summary, previous, now, default_rpo):
    """One VM's line of the report, from its run summary and its entry in the previous report ({} for none)."""
    vm = summary.get("vm")
    if not isinstance(vm, str) or not vm:
        raise UserError("A run summary names no VM (%r): each needs its vm." % (summary,))
    result = summary.get("result")
    if result not in RESULTS:
        raise UserError("The run summary of %s has result %r: it must be one of %s."
                        % (vm, result, ", ".join(RESULTS)))
    # A run that could not read the repository knows no newest backup: the previous report's still stands.
    newest = _newest(summary.get("newest")) or _newest(previous.get("newest"))
    age = max(now - newest["finished"], 0) if newest else None
    own_rpo = rpo_seconds(summary.get("rpo"), vm)
    rpo = own_rpo if own_rpo is not None else default_rpo
    change = summary.get("change") if isinstance(summary.get("change"), dict) else None
    return dict(
        vm=vm, hypervisor=summary.get("hypervisor") or previous.get("hypervisor"), result=result,
        backup=summary.get("backup"), level=summary.get("level"), bytes=int(_number(summary.get("bytes")) or 0),
        seconds=_number(summary.get("seconds")), reason=summary.get("reason"),
        finished=int(_number(summary.get("finished")) or now),
        newest=dict(newest, age_seconds=int(age)) if newest else None,
        rpo_seconds=rpo, rpo_source=None if rpo is None else "vm" if own_rpo is not None else "default",
        # Not reached, nothing vouches for the VM now, whatever its last backup's age.
        rpo_breached=rpo is not None and (result == UNREACHED or newest is None or age > rpo),
        change=change, change_flagged=bool(change and change.get("flagged") is True),
        failures_total=int(_number(previous.get("failures_total")) or 0) + (result in FAILURES),
        carried_over=False)


def warnings(entry):
    """What, besides a failure, needs attention in a VM's entry: its RPO breach and its change-rate flag."""
    found = []
    if entry["rpo_breached"]:
        rpo = human_duration(entry["rpo_seconds"])
        newest = entry["newest"]
        if newest is None:
            found.append("RPO %s breached: no good backup at all" % rpo)
        elif newest["age_seconds"] > entry["rpo_seconds"]:
            found.append("RPO %s breached: the newest backup, %s, is %s old"
                         % (rpo, newest["name"], human_duration(newest["age_seconds"])))
        else:
            found.append("RPO %s breached: not reached in this run (the newest backup, %s, is %s old)"
                         % (rpo, newest["name"], human_duration(newest["age_seconds"])))
    if entry["change_flagged"]:
        found.append(entry["change"].get("note") or "the change rate is far above its usual")
    return found


def problems(entry):
    """Why a VM needs attention, one line each; none when it needs none."""
    failure = ["%s: %s" % (entry["result"], entry["reason"] or "no reason given")] \
        if entry["result"] in FAILURES else []
    return failure + warnings(entry)


def build_report(summaries, previous, now, name, default_rpo=None, forget=()):
    """The run's report.

    summaries: each VM's run summary (the qemu_backup_summary fact, or {vm, result: unreached, reason} for a VM
    whose host has none); previous: the previous report or None; now: the run's time (seconds since the epoch);
    name: the report's; default_rpo: seconds, for the VMs whose summary has none; forget: VMs of the previous
    report not to carry over (removed from the fleet).
    """
    before = previous_entries(previous, "The previous report")
    entries = {}
    for summary in summaries:
        entry = vm_entry(summary, before.get(summary.get("vm"), {}), now, default_rpo)
        if entry["vm"] in entries:
            raise UserError("VM %s has two run summaries: give each VM once." % entry["vm"])
        entries[entry["vm"]] = entry
    for vm, old in before.items():
        if vm not in entries and vm not in forget:
            entries[vm] = _carried_over(old, previous.get("name"), now, default_rpo)
    vms = [entries[vm] for vm in sorted(entries)]
    attention = [dict(vm=entry["vm"], problems=problems(entry)) for entry in vms if problems(entry)]
    return dict(format=FORMAT, name=name, time=now, time_utc=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
                previous=previous.get("name") if previous else None, totals=_totals(vms, attention),
                attention=attention, vms=vms)


def _carried_over(old, previous_name, now, default_rpo):
    summary = dict(vm=old["vm"], result=UNREACHED, hypervisor=old.get("hypervisor"),
                   reason=NOT_MENTIONED % previous_name,
                   rpo=old.get("rpo_seconds") if old.get("rpo_source") == "vm" else None)
    return dict(vm_entry(summary, old, now, default_rpo), carried_over=True)


def _totals(vms, attention):
    def count(result):
        return sum(1 for entry in vms if entry["result"] == result)
    return dict(vms=len(vms), ok=count(OK), nothing_due=count(NOTHING_DUE), failed=count(FAILED),
                unreached=count(UNREACHED), bytes=sum(entry["bytes"] for entry in vms),
                seconds=round(sum(entry["seconds"] or 0 for entry in vms), 3),
                rpo_breached=sum(1 for entry in vms if entry["rpo_breached"]),
                change_flagged=sum(1 for entry in vms if entry["change_flagged"]), attention=len(attention))


def summary_message(report):
    """One line for the run: its counts, and who needs attention."""
    totals = report["totals"]
    counts = ", ".join("%d %s" % (totals[key], result) for key, result in (
        ("ok", OK), ("nothing_due", NOTHING_DUE), ("failed", FAILED), ("unreached", UNREACHED)) if totals[key])
    line = "%d VMs%s" % (totals["vms"], ": " + counts if counts else "")
    if report["attention"]:
        line += "; attention: " + ", ".join(
            "%s (%s)" % (item["vm"], "; ".join(item["problems"])) for item in report["attention"])
    return line


def _newest(value):
    """{name, finished} of a newest backup, or None for none or one without its finish time."""
    if not isinstance(value, dict) or _number(value.get("finished")) is None:
        return None
    return dict(name=value.get("name"), finished=int(_number(value["finished"])))


def _number(value):
    """value as a number, from a number or the digits that a template may have made of it; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
