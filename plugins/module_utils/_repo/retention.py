# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Retention by calendar: which restore points keep-last, keep-daily, keep-weekly and keep-monthly keep, and the
merges that drop the others from their chains.

The rules are Proxmox Backup Server's (and borg's before 1.2): keep_last keeps the newest N backups; then keep_daily keeps the
newest backup of each of the newest N days that have a backup not kept already, keep_weekly the same for ISO weeks,
keep_monthly for months. A period that holds a backup an earlier rule kept does not count. A backup any rule keeps is
kept; the newest is always kept, since the next incremental continues from it. Days are UTC days of the backups'
`finished` times: the same for every host that writes a shared repository, whatever its time zone.

A point that no rule keeps is dropped by merging: the oldest kept point of a chain becomes its new full (a synthetic
full of its whole view), and a kept point whose parent is dropped becomes an overlay of the kept point before it,
holding the clusters of the points between.
"""

from __future__ import annotations

import datetime
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError

CALENDAR_RULES = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")


def _period(rule, backups, index):
    """The period of a rule that backup number index falls in: itself for keep_last, else its UTC day, ISO week or
    month."""
    if rule == "keep_last":
        return index
    day = time.gmtime(backups[index]["finished"])
    if rule == "keep_daily":
        return day.tm_year, day.tm_yday
    if rule == "keep_weekly":
        return datetime.date(day.tm_year, day.tm_mon, day.tm_mday).isocalendar()[:2]
    return day.tm_year, day.tm_mon


def calendar_kept(backups, rules):
    """The names of the backups (oldest first, as the manifest lists them) that the calendar rules keep.

    rules: {keep_last, keep_daily, keep_weekly, keep_monthly: a count, 0 for none}. With every count 0 all are kept.
    """
    counts = {rule: rules.get(rule) or 0 for rule in CALENDAR_RULES}
    negative = [rule for rule, count in counts.items() if count < 0]
    if negative:
        raise UserError("%s must be 0 or more." % ", ".join(negative))
    if not backups or not any(counts.values()):
        return [b["name"] for b in backups]
    newest_first = sorted(range(len(backups)), key=lambda index: (backups[index]["finished"], index), reverse=True)
    marked = {}  # index: True when a rule kept it, False when a rule passed it over for a newer one of its period
    for rule, count in counts.items():
        if not count:
            continue
        covered = {_period(rule, backups, index) for index, kept in marked.items() if kept}
        periods = set()
        for index in newest_first:
            period = _period(rule, backups, index)
            if index in marked or period in covered:
                continue
            if period in periods:
                marked[index] = False
            elif len(periods) < count:
                periods.add(period)
                marked[index] = True
            else:
                break
    marked[len(backups) - 1] = True  # the manifest's last, which the next incremental continues: by order, not clock
    return [b["name"] for index, b in enumerate(backups) if marked.get(index)]


def merges(data, dropped):
    """The merges that drop these backups (names) from their chains: a list of {target, onto, drop}, oldest first.

    target: the kept backup that is rewritten; onto: the kept backup it becomes an overlay of, or None when it becomes
    its chain's full; drop: the backups between, which it no longer needs. A chain whose every backup is dropped is
    dropped whole, and the newest backups of an older chain that no kept backup needs are dropped, with no merge:
    {target: None, onto: None, drop: them}. The newest backup is never dropped.
    """
    backups = data["backups"]
    dropped = set(dropped)
    unknown = sorted(dropped - {b["name"] for b in backups})
    if unknown:
        raise UserError("No backup named %s in the manifest; its backups are: %s."
                        % (", ".join(unknown), ", ".join(b["name"] for b in backups) or "none"))
    if backups and backups[-1]["name"] in dropped:
        raise UserError("Backup %s is the newest: the next incremental continues from it, so it is never dropped."
                        % backups[-1]["name"])
    planned = []
    for chain in _chains(backups):
        kept = None
        between = []
        for backup in chain:
            if backup["name"] in dropped:
                between.append(backup["name"])
                continue
            if between:
                planned.append(dict(target=backup["name"], onto=kept, drop=between))
            kept, between = backup["name"], []
        if between:
            planned.append(dict(target=None, onto=None, drop=between))
    return planned


def _chains(backups):
    """The chains of the manifest, each as its backups from the full on, in manifest order."""
    chains = {}
    for backup in backups:
        chains.setdefault(backup["chain"], []).append(backup)
    for members in chains.values():
        for previous, backup in zip(members, members[1:]):
            if backup.get("parent") != previous["name"]:
                raise UserError("The manifest is damaged: backup %s of chain %s does not follow its parent %s; "
                                "check it with qemu_backup_verify." % (backup["name"], backup["chain"],
                                                                       backup.get("parent")))
    return list(chains.values())
