# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Whether a backup's point-in-time view still holds, as its NBD exports tell a copy or a stop.

Each disk of a QMP backup has two exports. The data export serves the scratch image, whose unwritten
clusters fall through to the live disk. The probe export serves a snapshot-access node on the same
copy-before-write filter: once the filter broke the snapshot (scratch space full, or cbw-timeout),
every read of the probe fails, and stays failing. So a probe that reads after a copy proves that
every read of that copy saw the point in time.

(QEMU 7.2's snapshot-access is not used for the data itself: its hbitmap_status() bug, fixed in QEMU
8.0, serves live data for a read or block status that starts in a cluster the filter copied and
ends in one it did not.)
"""

from __future__ import annotations

import json
from urllib.parse import quote, unquote

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import Connection, NbdError, NbdTimeout

DESCRIPTION_MARK = "fleetbackup point-in-time view "
PROBE_SUFFIX = "/intact"
PROBE_BYTES = 4096


class SnapshotBroken(FleetbackupError):
    """The point-in-time view broke: the guest overwrote data that could not be kept."""


def probe_export_name(export):
    return export + PROBE_SUFFIX


def describe_view(backup_id, disk, export, scratch_dir, cbw_timeout):
    """The data export's NBD description: what a copy needs to check the view and explain a break."""
    return DESCRIPTION_MARK + json.dumps(dict(backup=backup_id, disk=disk, probe=probe_export_name(export),
                                              scratch_dir=scratch_dir, cbw_timeout=cbw_timeout), sort_keys=True)


def parse_view(description):
    """{backup, disk, probe, scratch_dir, cbw_timeout} of one of our data exports, else None."""
    if not (description or "").startswith(DESCRIPTION_MARK):
        return None
    try:
        return json.loads(description[len(DESCRIPTION_MARK):])
    except ValueError:
        return None


def export_view(url):
    """The view that our data export at url describes, with its probe's URL.

    None for an export without our description (another NBD server's). Failing to connect raises: a copy must
    never skip the check because the server did not answer.
    """
    connection = Connection(url, full_info=True)
    try:
        view = parse_view(connection.description())
    finally:
        connection.close()
    if view is not None:
        view["probe_url"] = _with_export(url, view["probe"])
    return view


def _with_export(url, export):
    """url with its export name replaced (urlunsplit would drop the empty authority of nbd+unix:///...)."""
    location, question, query = url.partition("?")
    authority_end = location.index("/", location.index("//") + 2)
    return location[:authority_end] + "/" + quote(export) + question + query


def export_name_of(url):
    """The export name an NBD URL names (nbd+unix:///NAME?socket=..., nbd://host/NAME)."""
    location = url.partition("?")[0]
    return unquote(location[location.index("/", location.index("//") + 2) + 1:])


def view_intact(probe_url):
    """Whether the probe export still reads: False once the snapshot broke, or when the probe is gone.

    NbdTimeout when its server does not answer: that proves nothing either way.
    """
    connection = None
    try:
        connection = Connection(probe_url)
        connection.read_now(PROBE_BYTES, 0)
        return True
    except NbdTimeout:
        raise
    except NbdError:
        return False
    finally:
        if connection is not None:
            connection.close()


def check_view(view):
    """Fail if the backup's point-in-time view broke; views of exports that are not ours are not checked."""
    if view is not None and not view_intact(view["probe_url"]):
        raise SnapshotBroken(broken_view_message(view))


def broken_view_message(view):
    """What broke and what to do, for a copy that found the view broken."""
    return ("The backup's point-in-time view of disk %s broke while it was copied: the guest overwrote data "
            "that QEMU could not keep, because the scratch space in %s ran out or keeping it took longer than "
            "cbw_timeout (%ss). The guest's writes all landed; only this backup is lost. Give scratch_dir more "
            "room (scratch_size) or raise cbw_timeout, stop the backup, and run it again."
            % (view["disk"], view["scratch_dir"], view["cbw_timeout"]))
