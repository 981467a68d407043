# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The NBD layer: connect to an export, map its extents, copy it fast.

The copy runs one thread per NBD connection; each keeps many asynchronous
reads in flight and writes each one out as it completes, into a target that
all threads share (a raw file, or a qcow2 image written directly). libnbd and
pwrite release the GIL, and data stays in nbd.Buffer objects, never in Python
bytes.
"""

from __future__ import annotations

import os
import threading
from collections import deque

from ansible_collections.fleetbackup.qemu.plugins.module_utils import qcow2_writer
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qcow2_writer import create_image_file, write_all
from ansible_collections.fleetbackup.qemu.plugins.module_utils.write_behind import WriteBehind
from ansible_collections.fleetbackup.qemu.plugins.module_utils.nbd_extents import (
    CONTEXT_ALLOCATION,
    CONTEXT_ALLOCATION_DEPTH,
    COPY,
    DIRTY_BITMAP_PREFIX,
    STATUS_WINDOW,
    align_extents,
    clip,
    count_bytes,
    merge_extents,
    plan_operations,
)

try:
    import nbd
    HAS_LIBNBD = True
    LIBNBD_IMPORT_ERROR = None
except ImportError as import_error:
    HAS_LIBNBD = False
    LIBNBD_IMPORT_ERROR = import_error

# Work is handed to the connections in batches of about this many bytes of data.
BATCH_BYTES = 4 * 1024 ** 2
# QEMU refuses reads larger than this.
MAX_REQUEST_SIZE = 32 * 1024 ** 2


class NbdError(FleetbackupError):
    """An NBD failure, phrased for the user."""


def dirty_context(bitmap):
    """The meta context that exports dirty bitmap `bitmap`."""
    return bitmap if bitmap.startswith(DIRTY_BITMAP_PREFIX) else DIRTY_BITMAP_PREFIX + bitmap


def open_source(url, bitmap_context=None):
    """Connect to a read-only export asking for the contexts that the copy needs."""
    handle = nbd.NBD()
    handle.set_handle_name("fleetbackup-src")
    for context in (CONTEXT_ALLOCATION, CONTEXT_ALLOCATION_DEPTH, bitmap_context):
        if context:
            handle.add_meta_context(context)
    try:
        handle.connect_uri(url)
    except nbd.Error as err:
        raise NbdError("Cannot connect to NBD export %s: %s. Is the backup started, and is src "
                       "the url that qemu_backup_start returned?" % (url, err)) from None
    if not handle.can_meta_context(CONTEXT_ALLOCATION):
        close_handle(handle)
        raise NbdError("NBD export %s does not report base:allocation; it cannot be copied sparsely." % url)
    if bitmap_context and not handle.can_meta_context(bitmap_context):
        close_handle(handle)
        raise NbdError("NBD export %s does not export the dirty bitmap context %s: pass the "
                       "dirty_bitmap that qemu_backup_start returned for this disk." % (url, bitmap_context))
    return handle


def close_handle(handle):
    """Disconnect politely; the handle itself is freed with its last reference."""
    try:
        handle.shutdown()
    except nbd.Error:
        pass  # already disconnected, or never connected


def read_extents(handle, start, length, bitmap_context=None):
    """Yield the merged Extents of [start, start+length), asked in bounded windows."""
    contexts = [c for c in (CONTEXT_ALLOCATION, CONTEXT_ALLOCATION_DEPTH, bitmap_context)
                if c and handle.can_meta_context(c)]
    end = start + length
    offset = start
    while offset < end:
        replies = {context: [] for context in contexts}

        def collect(context, _offset, entries, _error):
            # libnbd passes a flat list: length, flags, length, flags...
            if context in replies:
                replies[context].extend(zip(entries[0::2], entries[1::2]))
            return 0

        window = min(STATUS_WINDOW, end - offset)
        try:
            handle.block_status(window, offset, collect)
        except nbd.Error as err:
            raise NbdError("Block status at offset %d failed: %s" % (offset, err)) from None
        extents = clip(merge_extents(offset, replies, bitmap_context), end)
        if not extents:
            raise NbdError("The NBD server answered block status at offset %d with no extent." % offset)
        yield from extents
        offset = extents[-1].start + extents[-1].length


class CopyStats:
    """What a copy did, shared by all its threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_zeroed = 0
        self.bytes_clean = 0

    def add_extents(self, extents):
        _, zero, clean = count_bytes(extents)
        with self.lock:
            self.bytes_zeroed += zero
            self.bytes_clean += clean

    def add_read(self, length):
        with self.lock:
            self.bytes_read += length


class WorkQueue:
    """Maps the disk in large block-status windows and hands out batches of planned operations.

    Mapping and batching are separate: a sparse disk is mapped a window
    (up to 2 GiB) per request, while data is handed out in small batches so
    that every connection stays busy.
    """

    def __init__(self, size, request_size, zero_target, bitmap_context, stats, target):
        self._size = size
        self._target = target
        self._mapped = 0
        self._ready = deque()
        self._lock = threading.Lock()
        self._request_size = request_size
        self._zero_target = zero_target
        self._bitmap_context = bitmap_context
        self._stats = stats

    def take(self, handle):
        """The next batch of operations, mapping more of the disk with `handle` when needed; None at the end."""
        with self._lock:
            while not self._ready and self._mapped < self._size:
                self._map_window(handle)
            batch = []
            data = 0
            while self._ready and data < BATCH_BYTES:
                operation = self._ready.popleft()
                batch.append(operation)
                data += operation[2] if operation[0] == COPY else 0
            return batch or None

    def _map_window(self, handle):
        length = min(STATUS_WINDOW, self._size - self._mapped)
        extents = align_extents(list(read_extents(handle, self._mapped, length, self._bitmap_context)),
                                self._target.alignment)
        self._mapped += length
        self._stats.add_extents(extents)
        operations = list(plan_operations(extents, self._request_size, self._zero_target))
        self._target.planned(operations, self._mapped)
        self._ready.extend(operations)


class FileTarget:
    """A fresh raw image written with pwrite from the copying threads, which release the GIL meanwhile.

    It never gets zero requests: a new sparse file already reads as zeros.
    """

    alignment = 1

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
    """

    alignment = qcow2_writer.CLUSTER_SIZE

    def __init__(self, path, size, backing, backing_format):
        self.writer = qcow2_writer.Qcow2Writer(path, size, backing, backing_format)
        self._lock = threading.Lock()
        self._pending = {}
        self._mapped = 0

    def planned(self, operations, mapped_through):
        with self._lock:
            for _, offset, length in operations:
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


class _Worker:
    """One source connection and one target: many reads in flight, each written out as it completes."""

    def __init__(self, src, target, queue, stats, requests, request_size):
        self.src = src
        self.target = target
        self.queue = queue
        self.stats = stats
        self.free = [nbd.Buffer(request_size) for _ in range(requests)]
        self.requests = requests
        self.in_flight = 0
        self.read_done = []
        self.error = None

    def run(self):
        try:
            self._copy()
        except Exception as err:  # pylint: disable=broad-except
            # A thread's exception would otherwise vanish and the copy look complete.
            self.error = self.error or str(err)

    def _copy(self):
        operations = []
        exhausted = False
        while True:
            self._write_completed_reads()
            while self.in_flight < self.requests and not self.error:
                if not operations:
                    planned = None if exhausted else self.queue.take(self.src)
                    if planned is None:
                        exhausted = True
                        break
                    operations = planned[::-1]
                    continue
                self._start(*operations.pop())
            if self.error:
                raise NbdError(self.error)
            if self.read_done:
                continue  # take() maps with block status, inside which libnbd may complete our reads
            if self.in_flight == 0:
                return
            self._wait()

    def _start(self, kind, offset, length):
        if kind != COPY:
            self.target.zero(offset, length)
            return
        self.in_flight += 1
        buf = self.free.pop()
        if buf.size() != length:
            buf = nbd.Buffer(length)
        self.src.aio_pread(buf, offset, completion=lambda err: self._on_read(err.value, buf, offset))

    # Completion callbacks run inside libnbd: they only record, never call a handle.
    def _on_read(self, errno_value, buf, offset):
        if errno_value:
            self._fail("read", offset, errno_value)
        else:
            self.read_done.append((buf, offset))
        return 1

    def _fail(self, kind, offset, errno_value):
        if self.error is None:
            self.error = "%s at offset %d failed: %s" % (kind.capitalize(), offset, os.strerror(errno_value))

    def _write_completed_reads(self):
        while self.read_done:
            buf, offset = self.read_done.pop()
            self.stats.add_read(buf.size())
            self.target.write(buf, offset)
            self.in_flight -= 1
            self.free.append(buf)

    def _wait(self):
        try:
            self.src.poll(-1)
        except nbd.Error as err:
            raise NbdError("The NBD server failed during the copy: %s" % err) from None


def copy(src_url, target, size, connections, bitmap_context=None, zero_target=True, requests=16,
         request_size=256 * 1024):
    """Copy the export at src_url into target over `connections` connections, one thread each.

    Returns (bytes_read, bytes_zeroed, bytes_clean).
    """
    stats = CopyStats()
    queue = WorkQueue(size, request_size, zero_target, bitmap_context, stats, target)
    workers = []
    try:
        for _ in range(connections):
            workers.append(_Worker(open_source(src_url, bitmap_context), target, queue, stats, requests,
                                   request_size))
        threads = [threading.Thread(target=worker.run, name="copy-%d" % index)
                   for index, worker in enumerate(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for worker in workers:
            close_handle(worker.src)
    errors = [worker.error for worker in workers if worker.error]
    if errors:
        raise NbdError(errors[0])
    return stats.bytes_read, stats.bytes_zeroed, stats.bytes_clean


def copy_to_image(src_url, path, image_format, size, bitmap_context=None, backing=None, backing_format=None,
                  connections=4, requests=16, request_size=256 * 1024):
    """Copy into a new image at path: raw written with pwrite, qcow2 written directly.

    backing is stored as given: keep it relative to the image's directory.

    The image is complete and durable when this returns. Returns (bytes_read, bytes_zeroed, bytes_clean).
    """
    try:
        if image_format == "raw":
            target = FileTarget(path, size)
        else:
            target = Qcow2Target(path, size, backing, backing_format)
        try:
            counts = copy(src_url, target, size, connections, bitmap_context, backing is None, requests,
                          request_size)
            target.finish()
            return counts
        finally:
            target.close()
    except OSError as err:
        raise FleetbackupError("Writing %s failed: %s" % (path, err.strerror or err)) from None


def export_size_and_connections(src_url, bitmap_context, wanted):
    """Probe the export: its size, and how many connections it allows (1 without multi-conn)."""
    handle = open_source(src_url, bitmap_context)
    try:
        return handle.get_size(), wanted if handle.can_multi_conn() else 1
    finally:
        close_handle(handle)
