# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""One base for every error whose message is written for the user.

Modules turn these into fail_json; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FleetbackupError(Exception):
    """A failure the user can act on; the message says what was wrong and what to do."""


class UserError(FleetbackupError):
    """Bad input, or a state of the VM or the files that the user must resolve."""
