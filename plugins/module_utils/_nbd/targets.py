# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""What a copy writes into: a raw file, a qcow2 image, an encrypted qcow2 image, or nothing (to sum a checksum only).

A target is shared by all the copying threads. The engine tells it each batch of operations it planned
(planned), then writes data (write) and zeros (zero) in any order, and at the end makes it durable (finish)
and closes it (close).
"""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    QemuImgError,
    alone,
    checked_qemu_img,
    served,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd import qcow2_writer
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import Connection
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import create_image_file, write_all
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.write_behind import WriteBehind


class FileTarget:
    """A fresh raw image written with pwrite from the copying threads, which release the GIL meanwhile.

    It never gets zero requests: a new sparse file already reads as zeros.
    """

    def __init__(self, path, size):
        self.path = path
        self.size = size
        self.fd = create_image_file(path)
        self._write_behind = WriteBehind(self.fd)

    def planned(self, operations, mapped_through):
        """Nothing to prepare: a raw file has no metadata."""

    def write(self, buf, offset):
        write_all(self.fd, buf.to_buffer(), offset, self.path)
        self._write_behind.written(offset, buf.size())

    def finish(self):
        os.ftruncate(self.fd, self.size)  # the size of the disk, also where its end is a hole
        os.fdatasync(self.fd)

    def close(self):
        os.close(self.fd)


class Qcow2Target:
    """A new qcow2 image, shared by all copying threads.

    It tells the writer when a 512 MiB region is done (mapped past, and no
    operation on it left), so only the tables of regions in progress stay in memory.
    compression_level: see Qcow2Writer; the writer compresses on the copying thread that writes.
    """

    def __init__(self, path, size, backing, backing_format, compression_level=None):
        self.writer = qcow2_writer.Qcow2Writer(path, size, backing, backing_format, compression_level)
        self._lock = threading.Lock()
        self._pending = {}
        self._mapped = 0

    def planned(self, operations, mapped_through):
        with self._lock:
            for _kind, offset, length in operations:
                for region in self._regions(offset, length):
                    self._pending[region] = self._pending.get(region, 0) + 1
            self._mapped = mapped_through
            self._release_done_regions()

    def write(self, buf, offset):
        self.writer.write(buf.to_buffer(), offset)
        self._operation_done(offset, buf.size())

    def zero(self, offset, length):
        self.writer.zero(offset, length)
        self._operation_done(offset, length)

    def _operation_done(self, offset, length):
        with self._lock:
            for region in self._regions(offset, length):
                self._pending[region] -= 1
            self._release_done_regions()

    @staticmethod
    def _regions(offset, length):
        return range(offset // qcow2_writer.REGION, (offset + length - 1) // qcow2_writer.REGION + 1)

    def _release_done_regions(self):
        for region in [r for r, count in self._pending.items() if count == 0]:
            if (region + 1) * qcow2_writer.REGION <= self._mapped:
                self.writer.region_done(region)
                del self._pending[region]

    def finish(self):
        self.writer.finish()

    def close(self):
        self.writer.close()


# What to check when the qemu-nbd that writes an encrypted image fails a write.
WRITE_ADVICE = "check the space and health of the file system that the backup image is written to, then copy again"
# QEMU's LUKS code times PBKDF2 by the thread's CPU time, which a coarse clock may show as none: it then refuses.
COARSE_CLOCK = "Unable to get accurate CPU usage"
CREATE_ATTEMPTS = 5  # a refusal comes at once, before the slow part


class EncryptedTarget:
    """A new LUKS-encrypted qcow2 image, made by qemu-img and written through a writable qemu-nbd of ours, which
    encrypts: every copying thread writes over a connection of its own.

    The server opens the image alone (no backing file): every write covers whole 64 KiB clusters, so QEMU never
    needs to read the backing file's data around one.
    """

    def __init__(self, path, size, backing, backing_format, encryption):
        self.path = path
        self.fd = qcow2_writer.create_image_file(path)
        self._local = threading.local()
        self._connections = []
        self._lock = threading.Lock()
        self._server = ExitStack()
        try:
            self._create(size, backing, backing_format, encryption)
            self.url = self._server.enter_context(served(alone(self.fd, "qcow2", encrypted=True), pass_fds=(self.fd,),
                                                         encryption=encryption, writable=True))
        except BaseException:
            self.close()
            remove_file(path)  # ours: made above
            raise

    def _create(self, size, backing, backing_format, encryption):
        # -u: the backing file is not opened; its name is stored as given, relative to the image's directory.
        backing_args = ["-u", "-b", backing, "-F", backing_format] if backing else []
        for attempt in range(CREATE_ATTEMPTS):
            try:
                checked_qemu_img("create", "-q", "-f", "qcow2", "-o", encryption.create_options(), *backing_args,
                                 "/dev/fd/%d" % self.fd, size, pass_fds=(self.fd,), encryption=encryption)
                return
            except QemuImgError as err:
                if COARSE_CLOCK not in str(err) or attempt + 1 == CREATE_ATTEMPTS:
                    raise

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = Connection(self.url, advice=WRITE_ADVICE)
            with self._lock:
                self._connections.append(connection)
        return connection

    def planned(self, operations, mapped_through):
        """Nothing to prepare: QEMU allocates as it writes."""

    def write(self, buf, offset):
        self._connection().write_now(buf, offset)

    def zero(self, offset, length):
        self._connection().zero_now(offset, length)

    def finish(self):
        for connection in self._connections:
            connection.flush_now()  # each: without multi-conn, a flush covers only its own connection's writes
        self._end_server()
        os.fsync(self.fd)

    def _end_server(self):
        for connection in self._connections:
            connection.close()
        self._connections = []
        self._server.close()  # qemu-nbd ends, its image closed

    def close(self):
        try:
            self._end_server()
        finally:
            os.close(self.fd)


class ChecksumOnly:
    """A target that keeps nothing: copying into it only sums the block checksum of the export."""

    def planned(self, operations, mapped_through):
        """Nothing to prepare."""

    def write(self, buf, offset):
        """Nothing to keep."""

    def zero(self, offset, length):
        """Nothing to keep."""

    def finish(self):
        """Nothing to make durable."""

    def close(self):
        """Nothing to close."""
