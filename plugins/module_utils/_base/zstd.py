# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Whether the zstandard bindings import: the one place that imports them, and what to do when they do not.

Only a copy asked to compress needs them, so a module checks for them once it knows, before it starts work.
"""

from __future__ import annotations

from ansible.module_utils.basic import missing_required_lib

try:
    # The qcow2 writer compresses with zstandard from here.
    import zstandard  # pylint: disable=unused-import
    HAS_ZSTANDARD = True
except ImportError:
    zstandard = None
    HAS_ZSTANDARD = False


def missing_zstandard():
    """What to do on a host whose python lacks the zstandard bindings, which compress=zstd needs."""
    return missing_required_lib("zstandard, which compress=zstd needs (Debian: apt install python3-zstandard, seen by "
                                "a venv made with --system-site-packages; elsewhere pip install zstandard)")
