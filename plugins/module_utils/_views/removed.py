# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""What the teardown of a point-in-time view removed (in check mode, would remove): one shape for every view."""

from __future__ import annotations


class Removed:
    """The stop's `removed` result. Every view fills in what it has; the rest stays empty."""

    def __init__(self, job=False, exports=(), nodes=(), devices=(), bitmaps=0, scratch_images=0, nbd_server=False,
                 objects=(), files=(), checkpoint=None, state_file=False):
        self.job = job  # libvirt's backup job
        self.exports = list(exports)
        self.nodes = list(nodes)
        self.devices = list(devices)  # the devices put back on their own nodes
        self.bitmaps = bitmaps  # the frozen copies of a checkpoint an incremental exported
        self.scratch_images = scratch_images
        self.nbd_server = nbd_server
        self.objects = list(objects)
        self.files = list(files)
        self.checkpoint = checkpoint
        self.state_file = state_file

    def result(self):
        return dict(vars(self))

    def __bool__(self):
        return any(vars(self).values())
