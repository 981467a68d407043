"""Retention by calendar: the points that keep-last, keep-daily, keep-weekly and keep-monthly keep, as Proxmox
Backup Server and borg keep them, and the merges that drop the others, with the images each rewrites."""

import calendar

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.consolidation import dropped_files, planned_merges, renewing
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.retention import calendar_kept, merges


def at(day, hour=2):
    """A UTC time of December 2026 (day 1 is a Tuesday), or of a later month with day past 31."""
    return calendar.timegm((2026, 12, 1, hour, 0, 0)) + (day - 1) * 86400


def backups(*times, chain_every=0):
    """Backups named b<i>, finished at times, in one chain (or a new chain every chain_every backups)."""
    made = []
    for index, finished in enumerate(times):
        full = not made or (chain_every and index % chain_every == 0)
        made.append(dict(name="b%d" % index, finished=finished, chain="b%d" % index if full else made[-1]["chain"],
                         parent=None if full else made[-1]["name"], disks=[]))
    return made


def kept(found, **rules):
    return calendar_kept(found, rules)


def test_no_rule_keeps_everything_and_keep_last_the_newest():
    found = backups(at(1), at(2), at(3))
    assert kept(found) == ["b0", "b1", "b2"]
    assert kept(found, keep_last=2) == ["b1", "b2"]
    assert kept(found, keep_last=9) == ["b0", "b1", "b2"]


def test_keep_daily_keeps_the_newest_of_each_day_and_days_without_backups_do_not_count():
    # Three a day on the 1st and the 2nd, none on the 3rd to 9th, one on the 10th.
    found = backups(at(1, 1), at(1, 5), at(1, 9), at(2, 1), at(2, 5), at(10))
    assert kept(found, keep_daily=2) == ["b4", "b5"]
    assert kept(found, keep_daily=3) == ["b2", "b4", "b5"]


def test_a_period_that_an_earlier_rule_kept_a_backup_of_does_not_count():
    found = backups(at(1, 1), at(1, 5), at(2, 1), at(2, 5))
    # keep_last keeps b3 (the 2nd); keep_daily's one day is then the 1st, whose newest is b1 (PBS and borg alike).
    assert kept(found, keep_last=1, keep_daily=1) == ["b1", "b3"]
    # b2 and b3 kept by keep_last cover the 2nd: the one daily is the 1st.
    assert kept(found, keep_last=2, keep_daily=1) == ["b1", "b2", "b3"]


def test_weeks_are_iso_weeks_and_months_calendar_months():
    # Sun 6 Dec is in ISO week 49 with Tue 1 Dec; Mon 7 Dec starts week 50; 31 Dec and 1 Jan share week 53.
    found = backups(at(1), at(6), at(7), at(31), at(32))
    assert kept(found, keep_weekly=2) == ["b2", "b4"]
    assert kept(found, keep_weekly=9) == ["b1", "b2", "b4"]
    assert kept(found, keep_monthly=2) == ["b3", "b4"]


def test_days_are_utc_days():
    found = backups(at(1, 23) + 3599, at(2, 0))  # 23:59:59 and 00:00 UTC: two days, whatever the local zone
    assert kept(found, keep_daily=2) == ["b0", "b1"]


def test_the_newest_is_always_kept_and_counts_must_not_be_negative():
    found = backups(at(1), at(2))
    assert kept(found, keep_monthly=1) == ["b1"]
    with pytest.raises(UserError, match="keep_daily must be 0 or more"):
        kept(found, keep_daily=-1)


def test_merges_make_the_oldest_kept_point_a_full_and_bridge_the_gaps():
    data = dict(backups=backups(*[at(day) for day in range(1, 7)]))
    assert merges(data, ["b0", "b1"]) == [dict(target="b2", onto=None, drop=["b0", "b1"])]
    assert merges(data, ["b2", "b3"]) == [dict(target="b4", onto="b1", drop=["b2", "b3"])]
    assert merges(data, ["b0", "b2", "b4"]) == [
        dict(target="b1", onto=None, drop=["b0"]),
        dict(target="b3", onto="b1", drop=["b2"]),
        dict(target="b5", onto="b3", drop=["b4"])]
    assert merges(data, []) == []


def test_merges_drop_whole_chains_and_the_tail_of_an_older_chain_without_rewriting():
    data = dict(backups=backups(*[at(day) for day in range(1, 7)], chain_every=3))
    assert merges(data, ["b0", "b1", "b2"]) == [dict(target=None, onto=None, drop=["b0", "b1", "b2"])]
    assert merges(data, ["b2"]) == [dict(target=None, onto=None, drop=["b2"])]


def test_merges_refuse_the_newest_an_unknown_name_and_a_broken_chain():
    data = dict(backups=backups(at(1), at(2), at(3)))
    with pytest.raises(UserError, match="b2 is the newest"):
        merges(data, ["b2"])
    with pytest.raises(UserError, match="No backup named nope"):
        merges(data, ["nope"])
    data["backups"][2]["parent"] = "b0"
    with pytest.raises(UserError, match="does not follow its parent b0"):
        merges(data, ["b1"])


def with_disks(found):
    """Each backup with a qcow2 disk vda (an overlay of its parent's in an incremental) and a raw disk vdb, backed up
    in full every time."""
    for backup in found:
        backup["disks"] = [
            dict(disk="vda", file="%s.vda.qcow2" % backup["name"], size=1,
                 backing="%s.vda.qcow2" % backup["parent"] if backup["parent"] else None),
            dict(disk="vdb", file="%s.vdb.qcow2" % backup["name"], size=1, backing=None)]
    return found


def test_a_merge_rewrites_each_overlay_from_its_layers_and_leaves_a_disk_backed_up_in_full():
    data = dict(backups=with_disks(backups(*[at(day) for day in range(1, 6)])))
    full, middle = planned_merges(data, ["b0", "b2", "b3"])
    assert full["rewrites"] == [dict(disk="vda", file="b1.vda.qcow2", size=1, layers=["b1.vda.qcow2", "b0.vda.qcow2"],
                                     backing=None)]
    assert middle["rewrites"] == [dict(disk="vda", file="b4.vda.qcow2", size=1,
                                       layers=["b4.vda.qcow2", "b3.vda.qcow2", "b2.vda.qcow2"],
                                       backing="b1.vda.qcow2")]
    assert dropped_files(data, ["b0"]) == ["b0.vda.qcow2", "b0.vdb.qcow2"]


def test_a_merge_renews_the_lease_every_interval_while_it_copies_and_a_lost_lease_fails_it():
    now, renewals = [100.0], []

    def keep_lease():
        renewals.append(now[0])
        if now[0] >= 160:
            raise UserError("Run r1 no longer holds the lease")
    report = renewing(keep_lease, every=20, clock=lambda: now[0])
    for moment in (101.0, 119.0, 120.0, 130.0, 141.0):  # the engine reports every second or so
        now[0] = moment
        report(0, 1)
    assert renewals == [120.0, 141.0]
    now[0] = 161.0
    with pytest.raises(UserError, match="no longer holds the lease"):
        report(0, 1)


def test_the_manifests_last_backup_is_kept_even_when_another_hosts_clock_made_an_older_one_look_newer():
    backups = [dict(name="b0", finished=1000), dict(name="b1", finished=3000), dict(name="b2", finished=2000)]
    assert calendar_kept(backups, dict(keep_last=1)) == ["b1", "b2"]
