# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A complete backup recorded in its repository's manifest, and old chains pruned from it, each saved durably."""

from __future__ import annotations

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.definition_files import store_definition
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import obsolete_checkpoints, prune, record


def record_backup(repository, planned, started_disks, copies, definition, consistency, check_mode):
    """The manifest entry of the backup, appended and saved (in check mode, only made)."""
    data = repository.load()
    if definition and not check_mode:
        definition = store_definition(repository, planned["name"], definition)
    entry = record(data, planned, started_disks, copies, int(time.time()), definition, consistency, repository.path)
    if not check_mode:
        repository.save(data)
    return entry


def prune_backups(repository, keep_chains, check_mode):
    """(pruned backups, the checkpoints no backup needs any more) after dropping chains beyond keep_chains."""
    data = repository.load()
    pruned, files = prune(data, keep_chains)
    if pruned and not check_mode:
        # The manifest goes first: a run killed half-way leaves unlisted files, never listed missing ones.
        repository.save(data)
        repository.remove_images(files)
    return pruned, obsolete_checkpoints(data, pruned)
