# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Whether libnbd's Python bindings import: the one place that imports them.

Apart from the client and the engine, so that a module checks for libnbd without carrying the copy engine.
"""

from __future__ import annotations

try:
    # The client and the engine take nbd from here.
    import nbd  # pylint: disable=unused-import
    HAS_LIBNBD = True
    LIBNBD_IMPORT_ERROR = None
except ImportError as import_error:
    nbd = None
    HAS_LIBNBD = False
    LIBNBD_IMPORT_ERROR = import_error
