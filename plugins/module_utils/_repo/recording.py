# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A complete backup recorded in its repository's manifest, and old backups pruned from it, each saved durably."""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.definition_files import store_definition
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.consolidation import drop
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import (
    chains_beyond,
    obsolete_checkpoints,
    record,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.retention import calendar_kept


def record_backup(repository, planned, started_disks, copies, definition, consistency, check_mode):
    """The manifest entry of the backup, appended and saved (in check mode, only made)."""
    data = repository.load()
    if definition and not check_mode:
        definition = store_definition(repository, planned["name"], definition)
    entry = record(data, planned, started_disks, copies, int(time.time()), definition, consistency, repository.path)
    if not check_mode:
        repository.save(data)
    return entry


def prune_backups(repository, retention, keep_lease, check_mode):
    """(dropped backups, merges, the checkpoints no backup needs any more) after dropping what retention does not keep.

    retention: keep_chains (whole chains beyond the newest ones), the calendar rules (retention.py), and drop, names
    of backups to drop besides. A point that a kept point needs is merged away (consolidation.py). keep_lease: called
    before each step of a merge.
    """
    data = repository.load()
    doomed = set(chains_beyond(data["backups"], retention.get("keep_chains") or 0)) | set(retention.get("drop") or ())
    remaining = [b for b in data["backups"] if b["name"] not in doomed]
    kept = calendar_kept(remaining, retention)
    doomed.update(b["name"] for b in remaining if b["name"] not in kept)
    dropped, merged = drop(repository, sorted(doomed), keep_lease, check_mode)
    left = dict(backups=[b for b in data["backups"] if b["name"] not in doomed])
    return dropped, merged, obsolete_checkpoints(left, dropped)
