# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Whether the xxhash bindings import: the one place that imports them, and what to do when they do not.

Apart from the checksum, so that a module checks for them before it starts work, as it does for libnbd.
"""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

try:
    # The block checksum takes xxhash from here.
    import xxhash  # pylint: disable=unused-import
    HAS_XXHASH = True
    XXHASH_IMPORT_ERROR = None
except ImportError as import_error:
    xxhash = None
    HAS_XXHASH = False
    XXHASH_IMPORT_ERROR = import_error


def missing_xxhash():
    """What to do on a host whose python lacks the xxhash bindings, which the block checksum needs."""
    return missing_required_lib("xxhash, which the block checksum needs (Debian: apt install python3-xxhash, seen by a "
                                "venv made with --system-site-packages; elsewhere pip install xxhash)")
