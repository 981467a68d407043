# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The base of every module: library checks and uniform errors."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.fast_hash import HAS_XXHASH, XXHASH_IMPORT_ERROR, missing_xxhash
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.libnbd import HAS_LIBNBD, LIBNBD_IMPORT_ERROR
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import shown_paths


def missing_libnbd():
    """What to do on a host whose python lacks libnbd's bindings."""
    return missing_required_lib("libnbd's Python bindings (Debian: apt install python3-libnbd; the pip package 'nbd' "
                                "is unrelated), with an interpreter that sees them")


class FleetbackupModule(AnsibleModule):
    """An AnsibleModule that checks its libraries and turns our errors into fail_json."""

    def __init__(self, argument_spec, needs_nbd=False, needs_checksums=False, **kwargs):
        super().__init__(argument_spec=argument_spec, **kwargs)
        if needs_nbd and not HAS_LIBNBD:
            self.fail_json(msg=missing_libnbd(), exception=str(LIBNBD_IMPORT_ERROR))
        if needs_checksums and not HAS_XXHASH:
            self.fail_json(msg=missing_xxhash(), exception=str(XXHASH_IMPORT_ERROR))

    def exit_json(self, **kwargs):
        super().exit_json(**shown_paths(kwargs))

    def fail_json(self, msg, **kwargs):
        super().fail_json(msg=shown_paths(msg), **shown_paths(kwargs))

    def warn_all(self, messages):
        for message in messages:
            self.warn(message)

    def run(self, main):
        """Call main(self) and exit with its result; our errors, and a result that says failed, become fail_json."""
        try:
            result = main(self)
        except FleetbackupError as err:
            self.fail_json(msg=str(err))
        if result.get("failed"):
            self.fail_json(**result)
        self.exit_json(**result)
