"""A fleet run's report: per-VM lines, RPO breaches, carry-over of VMs not reached, counters across runs, and the
filters that make summaries of hosts and lines of summaries."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.filter.run_summary import run_summary
from ansible_collections.fleetbackup.qemu.plugins.filter.summary_line import summary_line
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.run_report import (
    build_report,
    human_duration,
    run_name,
    summary_message,
)

NOW = 1796660000
HOUR = 3600
FLAGGED = dict(dirty_bytes=42, disk_bytes=100, share=0.42, median_share=0.014, samples=5, flagged=True,
               note="vda: 42% of the disk changed since the last backup")


def ok(vm, age=0, **more):
    return dict(dict(vm=vm, result="ok", backup="b-%s" % vm, level="incremental", bytes=2048, seconds=1.5,
                     reason=None, finished=NOW, newest=dict(name="b-%s" % vm, finished=NOW - age)), **more)


def build(summaries, previous=None, now=NOW, rpo=None, forget=()):
    return build_report(summaries, previous, now, run_name(now), rpo, forget)


def by_vm(report):
    return {entry["vm"]: entry for entry in report["vms"]}


def test_the_report_has_every_vm_its_totals_and_who_needs_attention():
    report = build([
        ok("web1", rpo=24 * HOUR, hypervisor="hv1"),
        ok("web2", change=FLAGGED),
        dict(vm="db1", result="failed", reason="the disk is full", finished=NOW - 5,
             newest=dict(name="b-old", finished=NOW - 30 * HOUR)),
        dict(vm="idle", result="nothing due", reason="younger than max_age", newest=dict(name="b-i", finished=NOW)),
    ], rpo=24 * HOUR)
    assert report["format"] == 1 and report["name"] == "20261207T161320Z" and report["previous"] is None
    assert [entry["vm"] for entry in report["vms"]] == ["db1", "idle", "web1", "web2"]
    web1 = by_vm(report)["web1"]
    assert web1 == dict(vm="web1", hypervisor="hv1", result="ok", backup="b-web1", level="incremental", bytes=2048,
                        seconds=1.5, reason=None, finished=NOW, newest=dict(name="b-web1", finished=NOW, age_seconds=0),
                        rpo_seconds=24 * HOUR, rpo_source="vm", rpo_breached=False, change=None, change_flagged=False,
                        failures_total=0, carried_over=False)
    assert report["totals"] == dict(vms=4, ok=2, nothing_due=1, failed=1, unreached=0, bytes=4096, seconds=3.0,
                                    rpo_breached=1, change_flagged=1, attention=2)
    assert report["attention"] == [
        dict(vm="db1", problems=["failed: the disk is full",
                                 "RPO 24h breached: the newest backup, b-old, is 30h old"]),
        dict(vm="web2", problems=[FLAGGED["note"]])]
    assert summary_message(report) == (
        "4 VMs: 2 ok, 1 nothing due, 1 failed; attention: db1 (failed: the disk is full; RPO 24h breached: the "
        "newest backup, b-old, is 30h old), web2 (vda: 42% of the disk changed since the last backup)")


@pytest.mark.parametrize("summary,rpo,breached,line", [
    (ok("fresh", age=HOUR), 24 * HOUR, False, None),
    (ok("old", age=25 * HOUR), 24 * HOUR, True, "RPO 24h breached: the newest backup, b-old, is 25h old"),
    (ok("own", age=2 * HOUR, rpo="1h"), 24 * HOUR, True, "RPO 1h breached: the newest backup, b-own, is 2h old"),
    (ok("none", age=99 * HOUR), None, False, None),
    (dict(vm="new", result="failed", reason="x", newest=None), 24 * HOUR, True,
     "RPO 24h breached: no good backup at all"),
    (dict(vm="far", result="unreached", reason="x", newest=dict(name="b", finished=NOW - 60)), HOUR, True,
     "RPO 1h breached: not reached in this run (the newest backup, b, is 1m old)"),
])
def test_the_rpo_is_breached_by_an_old_newest_backup_none_at_all_or_no_reach(summary, rpo, breached, line):
    entry = build([summary], rpo=rpo)["vms"][0]
    assert entry["rpo_breached"] is breached
    assert [item["problems"][-1] for item in build([summary], rpo=rpo)["attention"]
            if item["problems"][-1].startswith("RPO")] == ([line] if line else [])


def test_a_vm_this_run_did_not_mention_is_carried_over_as_unreached_and_its_failures_count_on():
    first = build([ok("web1", rpo=2 * HOUR, hypervisor="hv1"), ok("web2"),
                   dict(vm="db1", result="failed", reason="x")], rpo=24 * HOUR)
    later = NOW + 3 * HOUR
    second = build([dict(ok("web2"), finished=later, newest=dict(name="b2", finished=later))], first, later,
                   rpo=24 * HOUR)
    assert second["previous"] == first["name"]
    web1, web2, db1 = (by_vm(second)[vm] for vm in ("web1", "web2", "db1"))
    assert web1["carried_over"] and web1["result"] == "unreached" and web1["hypervisor"] == "hv1"
    assert web1["reason"] == ("not in this run: its hypervisor was not reached, so the VM was not found (carried "
                              "over from report %s)" % first["name"])
    # Its newest backup from the previous report, its own RPO kept; breached, since nothing vouches for it now.
    assert web1["newest"] == dict(name="b-web1", finished=NOW, age_seconds=3 * HOUR)
    assert web1["rpo_seconds"] == 2 * HOUR and web1["rpo_source"] == "vm" and web1["rpo_breached"]
    assert (web1["failures_total"], db1["failures_total"], web2["failures_total"]) == (1, 2, 0)
    assert not web2["carried_over"]
    third = build([], second, later + HOUR, rpo=12 * HOUR)
    assert by_vm(third)["web1"]["failures_total"] == 2 and by_vm(third)["db1"]["failures_total"] == 3
    # A default RPO is not carried: the run's default applies.
    assert by_vm(third)["web2"]["rpo_seconds"] == 12 * HOUR and by_vm(third)["web1"]["rpo_seconds"] == 2 * HOUR
    assert [entry["vm"] for entry in build([], third, later, forget=["web1", "db1"])["vms"]] == ["web2"]


def test_a_failed_run_that_could_not_read_the_repository_keeps_the_previous_newest_backup():
    first = build([ok("web1")])
    second = build([dict(vm="web1", result="failed", reason="NFS is gone", newest=None)], first, NOW + 60)
    assert by_vm(second)["web1"]["newest"] == dict(name="b-web1", finished=NOW, age_seconds=60)


@pytest.mark.parametrize("summaries,previous,words", [
    ([dict(result="ok")], None, "names no VM"),
    ([dict(vm="a", result="done")], None, "has result 'done'"),
    ([dict(vm="a", result="ok"), dict(vm="a", result="failed")], None, "two run summaries"),
    ([dict(vm="a", result="ok", rpo="soon")], None, "The RPO of a: Invalid duration 'soon'"),
    ([], dict(format=0, vms=[]), "is not a run report of this version"),
    ([], dict(format=1, vms=[dict(name="a")]), "is not a run report of this version"),
    ([], ["a"], "is not a run report of this version"),
])
def test_summaries_and_reports_of_the_wrong_shape_are_refused(summaries, previous, words):
    with pytest.raises(UserError, match=words):
        build(summaries, previous)


def test_numbers_that_a_template_made_strings_are_read():
    entry = build([dict(vm="a", result="ok", level="full", bytes="4096", seconds="2.5", finished=str(NOW),
                        newest=dict(name="b", finished=str(NOW)), rpo="3600")])["vms"][0]
    assert (entry["bytes"], entry["seconds"], entry["newest"]["finished"], entry["rpo_seconds"]) == (
        4096, 2.5, NOW, 3600)


@pytest.mark.parametrize("seconds,text", [(5, "5s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h"),
                                          (3600 + 59, "1h"), (3600 + 60, "1h 1m"), (47 * HOUR, "47h"),
                                          (48 * HOUR, "2d"), (50 * HOUR, "2d 2h"), (-1, "0s")])
def test_human_durations(seconds, text):
    assert human_duration(seconds) == text


def test_run_summary_adds_the_hypervisor_and_makes_an_unreached_summary_of_a_host_without_one():
    host = dict(inventory_hostname="web1@hv1", fleetbackup_hypervisor="hv1", qemu_backup_summary=ok("web1@hv1"))
    assert run_summary(host) == dict(ok("web1@hv1"), hypervisor="hv1")
    assert run_summary(dict(inventory_hostname="db1", qemu_backup_vm="db1.1234abcd")) == dict(
        vm="db1.1234abcd", result="unreached",
        reason="no result: its hypervisor was unreachable, or the run stopped before it")
    assert run_summary(ok("web2")) == ok("web2")


def test_summary_line_says_an_rpo_breach_and_a_flagged_change():
    assert summary_line(ok("web1", age=0)) == "web1: incremental 2.00 KB in 1.5 s"
    assert summary_line(ok("web1", change=FLAGGED)) == (
        "web1: incremental 2.00 KB in 1.5 s; vda: 42% of the disk changed since the last backup")
    old = dict(vm="db1", result="failed", reason="the disk is full", rpo=3600,
               newest=dict(name="b0", finished=NOW - 10 * 86400))
    assert summary_line(old).startswith("db1: failed: the disk is full; RPO 1h breached: the newest backup, b0, is ")
    assert summary_line(dict(inventory_hostname="gone")) == (
        "gone: unreached: no result: its hypervisor was unreachable, or the run stopped before it")
