# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The NBD layer: connect to an export, map its extents, copy it fast.

The copy runs one thread per connection; each thread owns one source and one
destination handle and keeps many asynchronous requests in flight. libnbd
releases the GIL in every call, and data stays in nbd.Buffer objects, never
in Python bytes.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import tempfile
import threading
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.nbd_extents import (
    CONTEXT_ALLOCATION,
    CONTEXT_ALLOCATION_DEPTH,
    COPY,
    DIRTY_BITMAP_PREFIX,
    STATUS_WINDOW,
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

# Work is handed to the connections in slices of this many bytes of the disk.
WORK_SLICE = 128 * 1024 ** 2
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
        data, zero, clean = count_bytes(extents)
        with self.lock:
            self.bytes_zeroed += zero
            self.bytes_clean += clean

    def add_read(self, length):
        with self.lock:
            self.bytes_read += length


class WorkQueue:
    """Hands out the disk in slices; each slice comes with its planned operations."""

    def __init__(self, size, request_size, zero_target, bitmap_context, stats):
        self._size = size
        self._next = 0
        self._lock = threading.Lock()
        self._request_size = request_size
        self._zero_target = zero_target
        self._bitmap_context = bitmap_context
        self._stats = stats

    def take(self, handle):
        """Plan the next slice with `handle`'s block status; None when the disk is done."""
        with self._lock:
            start = self._next
            if start >= self._size:
                return None
            self._next = min(self._size, start + WORK_SLICE)
        extents = list(read_extents(handle, start, min(WORK_SLICE, self._size - start), self._bitmap_context))
        self._stats.add_extents(extents)
        return list(plan_operations(extents, self._request_size, self._zero_target))


class _Worker:
    """One connection pair: reads from src and writes to dst with many requests in flight."""

    def __init__(self, src, dst, queue, stats, requests, request_size):
        self.src = src
        self.dst = dst
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
            self.dst.flush()
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
            if self.in_flight == 0 and not self.read_done:
                return
            self._wait()

    def _start(self, kind, offset, length):
        self.in_flight += 1
        if kind == COPY:
            buf = self.free.pop()
            if buf.size() != length:
                buf = nbd.Buffer(length)
            self.src.aio_pread(buf, offset, completion=lambda err: self._on_read(err, buf, offset))
        else:
            self.dst.aio_zero(length, offset, completion=lambda err: self._on_write(err, None, "zero", offset))

    # Completion callbacks run inside libnbd: they only record, never call a handle.
    def _on_read(self, err, buf, offset):
        if err.value:
            self._fail("read", offset, err.value)
        else:
            self.read_done.append((buf, offset))
        return 1

    def _on_write(self, err, buf, kind, offset):
        self.in_flight -= 1
        if buf is not None:
            self.free.append(buf)
        if err.value:
            self._fail(kind, offset, err.value)
        return 1

    def _fail(self, kind, offset, errno_value):
        if self.error is None:
            self.error = "NBD %s at offset %d failed: %s" % (kind, offset, os.strerror(errno_value))

    def _write_completed_reads(self):
        while self.read_done:
            buf, offset = self.read_done.pop()
            self.stats.add_read(buf.size())
            self.dst.aio_pwrite(buf, offset, completion=lambda err, b=buf, o=offset: self._on_write(err, b, "write", o))

    def _wait(self):
        poller = select.poll()
        handles = {}
        for handle in (self.src, self.dst):
            direction = handle.aio_get_direction()
            events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | \
                     (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0)
            if events:
                poller.register(handle.aio_get_fd(), events)
                handles[handle.aio_get_fd()] = handle
        for fd, revents in poller.poll(1000):
            handle = handles[fd]
            if revents & select.POLLIN:
                handle.aio_notify_read()
            elif revents & select.POLLOUT:
                handle.aio_notify_write()
            if revents & (select.POLLHUP | select.POLLERR) and not revents & select.POLLIN:
                raise NbdError("The NBD server closed the connection during the copy.")


def copy(src_url, dst_urls, size, bitmap_context=None, zero_target=True,
         requests=16, request_size=1024 ** 2):
    """Copy the export at src_url to the servers at dst_urls, one connection pair each.

    Returns (bytes_read, bytes_zeroed, bytes_clean).
    """
    stats = CopyStats()
    queue = WorkQueue(size, request_size, zero_target, bitmap_context, stats)
    workers = []
    try:
        for dst_url in dst_urls:
            src = open_source(src_url, bitmap_context)
            workers.append(_Worker(src, open_target(dst_url), queue, stats, requests, request_size))
        threads = [threading.Thread(target=worker.run, name="copy-%d" % index)
                   for index, worker in enumerate(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for worker in workers:
            close_handle(worker.src)
            close_handle(worker.dst)
    errors = [worker.error for worker in workers if worker.error]
    if errors:
        raise NbdError(errors[0])
    return stats.bytes_read, stats.bytes_zeroed, stats.bytes_clean


def export_size_and_connections(src_url, bitmap_context, wanted):
    """Probe the export: its size, and how many connections it allows (1 without multi-conn)."""
    handle = open_source(src_url, bitmap_context)
    try:
        return handle.get_size(), wanted if handle.can_multi_conn() else 1
    finally:
        close_handle(handle)


def open_target(url):
    handle = nbd.NBD()
    handle.set_handle_name("fleetbackup-dst")
    try:
        handle.connect_uri(url)
    except nbd.Error as err:
        raise NbdError("Cannot connect to the image writer at %s: %s" % (url, err)) from None
    return handle


class ImageWriter:
    """qemu-nbd serving a destination image on a private socket, started by us and ended by PID.

    It keeps qcow2 sparse, turns zero requests into zero clusters and
    accepts `connections` writers at once.
    """

    def __init__(self, path, image_format, connections):
        self.path = path
        self.image_format = image_format
        self.connections = connections
        self._dir = None
        self._process = None

    def __enter__(self):
        self._dir = tempfile.mkdtemp(prefix="fleetbackup-writer-")
        socket_path = os.path.join(self._dir, "nbd.sock")
        # Socket activation: the socket listens before qemu-nbd starts, so nothing has to wait for it.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(socket_path)
            listener.listen(self.connections)
            self._process = subprocess.Popen(
                ["qemu-nbd", "--format", self.image_format, "--shared", str(self.connections),
                 "--cache", "writeback", "--discard", "unmap", self.path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=sorted({listener.fileno(), 3}),
                preexec_fn=lambda: _become_socket_activated(listener.fileno()))
        except OSError as err:
            self._cleanup_dir()
            raise NbdError("Cannot start qemu-nbd for %s: %s (install qemu-utils)" % (self.path, err)) from None
        finally:
            listener.close()
        self.url = "nbd+unix:///?socket=" + socket_path
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """End qemu-nbd by its PID; it flushes and closes the image on SIGTERM."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
            _, stderr = self._process.communicate()
            returncode = self._process.returncode
            self._process = None
            self._cleanup_dir()
            if returncode not in (0, -15):
                raise NbdError("qemu-nbd writing %s failed (exit %s): %s"
                               % (self.path, returncode, stderr.decode(errors="replace").strip()))
        self._cleanup_dir()

    def _cleanup_dir(self):
        if self._dir:
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)
            self._dir = None


def _become_socket_activated(listen_fd):
    """In the child before exec: put the listening socket on fd 3 as systemd would."""
    if listen_fd != 3:
        os.dup2(listen_fd, 3)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = "1"


def elapsed_since(started):
    return max(time.monotonic() - started, 1e-6)
