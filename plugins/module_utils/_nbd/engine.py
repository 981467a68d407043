# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The copy engine: copy an NBD export fast into a target (targets.py), over several connections (client.py).

The copy runs one thread per NBD connection; each keeps many asynchronous
reads in flight and writes each one out as it completes, into a target that
all threads share (a raw file, or a qcow2 image written directly). libnbd and
pwrite release the GIL, and data stays in nbd.Buffer objects, never in Python
bytes. Each thread also sums the block checksum (checksum.py) of what it
writes, on the buffer it just wrote, so the image is never read twice; every
operation covers whole 64 KiB blocks at block-aligned offsets.

A bandwidth limit meters the reads of all threads together, and a report
callback learns the progress about once a second from a thread of its own.

No wait is unbounded (see client.py), and the first thread that fails stops all the others.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque, namedtuple

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.checksum import BLOCK_SIZE, CURRENT, BlockSum
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import (
    IO_TIMEOUT,
    Abort,
    Aborted,
    Connection,
    export_size_and_connections,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import (
    COPY,
    STATUS_WINDOW,
    align_extents,
    count_bytes,
    plan_operations,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.libnbd import nbd
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import write_failure
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.targets import (
    ChecksumOnly,
    EncryptedTarget,
    FileTarget,
    Qcow2Target,
)

# Work is handed to the connections in batches of about this many bytes of data.
BATCH_BYTES = 4 * 1024 ** 2
# QEMU refuses reads larger than this.
MAX_REQUEST_SIZE = 32 * 1024 ** 2
# The read buffers of a copy, connections x requests x request_size, stay within this: 64 times the default,
# far past the point where more stop helping, and little beside the VMs that the hypervisor's memory is for.
MAX_BUFFER_BYTES = 1024 ** 3
# Seconds between two progress reports.
REPORT_INTERVAL = 1.0


class CopyStats:
    """What a copy did, shared by all its threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_zeroed = 0
        self.bytes_clean = 0
        self.bytes_written_as_zeros = 0

    @property
    def done(self):
        """Bytes processed so far: read, or written as zeros."""
        return self.bytes_read + self.bytes_written_as_zeros

    def add_extents(self, extents):
        _data, zero, clean = count_bytes(extents)
        with self.lock:
            self.bytes_zeroed += zero
            self.bytes_clean += clean

    def add_read(self, length):
        with self.lock:
            self.bytes_read += length

    def add_written_as_zeros(self, length):
        with self.lock:
            self.bytes_written_as_zeros += length


def aligned_extents(src, start, length):
    """The Extents of [start, start+length) over Connection src, cut at whole blocks."""
    return align_extents(list(src.extents(start, length)), BLOCK_SIZE)


def planned_bytes(src, size, zero_target):
    """Bytes a copy will process: data to read, and zeros to write unless the target reads as zeros already.

    It maps the disk once more, with block status only, so that progress has a total from the start.
    """
    total = 0
    for start in range(0, size, STATUS_WINDOW):
        data, zero, _clean = count_bytes(aligned_extents(src, start, min(STATUS_WINDOW, size - start)))
        total += data + (0 if zero_target else zero)
    return total


class Throttle:
    """A bandwidth limit shared by the threads of a copy: reads start at rate bytes per second on average.

    A thread accounts for each read as it starts it and learns when it may start the next one; beyond the
    first read of each thread, reads never run ahead of the rate.
    """

    def __init__(self, rate):
        self._seconds_per_byte = 1.0 / rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def reserve(self, length):
        """Account for a read of length bytes starting now; returns the monotonic time the next read may start."""
        with self._lock:
            self._next = max(self._next, time.monotonic()) + length * self._seconds_per_byte
            return self._next


class WorkQueue:
    """Maps the disk in large block-status windows and hands out batches of planned operations.

    Mapping and batching are separate: a sparse disk is mapped a window
    (up to 2 GiB) per request, while data is handed out in small batches so
    that every connection stays busy.
    """

    def __init__(self, size, request_size, zero_target, stats, target, abort):
        self._size = size
        self._abort = abort
        self._target = target
        self._mapped = 0
        self._ready = deque()
        self._lock = threading.Lock()
        self._request_size = request_size
        self._zero_target = zero_target
        self._stats = stats

    def take(self, src):
        """The next batch of operations, mapping more of the disk over Connection src when needed.

        None at the end, and once the copy has failed.
        """
        with self._lock:
            if self._abort.error:
                return None
            while not self._ready and self._mapped < self._size:
                self._map_window(src)
            batch = []
            data = 0
            while self._ready and data < BATCH_BYTES:
                operation = self._ready.popleft()
                batch.append(operation)
                data += operation[2] if operation[0] == COPY else 0
            return batch or None

    def _map_window(self, src):
        length = min(STATUS_WINDOW, self._size - self._mapped)
        extents = aligned_extents(src, self._mapped, length)
        self._mapped += length
        self._stats.add_extents(extents)
        operations = list(plan_operations(extents, self._request_size, self._zero_target))
        self._target.planned(operations, self._mapped)
        self._ready.extend(operations)


class _Worker:
    """One source connection and one target: many reads in flight, each written out as it completes."""

    def __init__(self, src, target, queue, stats, requests, request_size, throttle, checksum):
        self.src = src
        self.target = target
        self.queue = queue
        self.stats = stats
        self.throttle = throttle
        self.checksum = checksum  # this thread's share; the copy adds them up
        self.free = [nbd.Buffer(request_size) for _request in range(requests)]
        self.reading = 0  # reads on the wire
        self.read_done = []  # reads completed and not yet written
        self.read_error = None
        self.next_read_at = 0.0  # monotonic time before which the bandwidth limit starts no read

    def run(self):
        try:
            self._copy()
        except Aborted:
            pass  # the failure of another thread, which the copy reports
        except Exception as err:  # pylint: disable=broad-except
            # Stops the other threads, and the copy raises it: it would otherwise vanish with this thread.
            self.src.abort.fail(err)

    def _copy(self):
        operations = []
        exhausted = False
        while True:
            if self.read_error:
                raise self.read_error
            self._write_completed_reads()
            while self.free and not exhausted and not self._held_back():
                if operations:
                    self._start(*operations.pop())
                else:
                    batch = self.queue.take(self.src)
                    exhausted = batch is None
                    operations = (batch or [])[::-1]
            if self.read_done:
                continue  # take() maps with block status, inside which libnbd may complete our reads
            if self.reading:
                self.src.wait_until(lambda: self.read_done or self.read_error, "read from")
            elif exhausted:
                return
            else:  # held back by the bandwidth limit, with nothing on the wire
                self.src.abort.event.wait(max(0.0, self.next_read_at - time.monotonic()))

    def _held_back(self):
        return self.throttle is not None and time.monotonic() < self.next_read_at

    def _start(self, kind, offset, length):
        if kind != COPY:
            self.target.zero(offset, length)
            self.checksum.add_zeros(offset, length)
            self.stats.add_written_as_zeros(length)
            return
        buf = self.free.pop()
        if buf.size() != length:
            buf = nbd.Buffer(length)
        self.reading += 1
        self.src.read(buf, offset, lambda error: self._on_read(error.value, buf, offset))
        if self.throttle is not None:
            self.next_read_at = self.throttle.reserve(length)

    # Completion callbacks run inside libnbd: they only record, never call a handle.
    def _on_read(self, errno_value, buf, offset):
        self.reading -= 1
        if errno_value:
            self.free.append(buf)
            self.read_error = self.read_error or self.src.failure("read offset %d of" % offset,
                                                                  os.strerror(errno_value))
        else:
            self.read_done.append((buf, offset))
        return 1

    def _write_completed_reads(self):
        while self.read_done:
            buf, offset = self.read_done.pop()
            self.target.write(buf, offset)
            self.checksum.add_data(buf, offset)
            self.stats.add_read(buf.size())
            self.free.append(buf)


CopyResult = namedtuple("CopyResult", "bytes_read bytes_zeroed bytes_clean checksum")
CopyResult.__doc__ = "What a copy did; checksum is the block checksum of what it wrote (checksum.py)."


def _report_progress(report, stats, total, stop, abort):
    """Call report(done, total) every REPORT_INTERVAL seconds until stop is set; a failure fails the copy."""
    try:
        while not stop.wait(REPORT_INTERVAL):
            report(stats.done, total)
    except Exception as err:  # pylint: disable=broad-except
        abort.fail(err)


def _join_by(threads, deadline, abort):
    """Wait for the threads; past deadline (monotonic, or None), fail the copy, which stops them."""
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            abort.fail(FleetbackupError("The copy did not end in the time it was given (copy_timeout): it was "
                                        "stopped. Give it more time, or a higher bandwidth."))
            return


def copy(src_url, target, size, connections, bitmap_context=None, zero_target=True, requests=16,
         request_size=256 * 1024, io_timeout=IO_TIMEOUT, bandwidth=0, report=None, image_alone=False,
         checksum_algorithm=CURRENT, deadline=None):
    """Copy the export at src_url into target over `connections` connections, one thread each.

    bandwidth: bytes per second that the reads of all connections together may take; 0 for no limit.
    report: called as report(done, total) with the bytes processed (read, or written as zeros) and the bytes
    the copy will process, once the disk is mapped, then about once a second, and at the end of a copy that
    succeeded. image_alone: the export is one image without its backing file (see Extent), as when checking it.
    checksum_algorithm: the Algorithm of the block checksum (checksum.py); a target that does not read as zeros
    (zero_target false) is an overlay. deadline: the time.monotonic() by which the copy must end, else it fails;
    None for no limit.

    Every thread has ended when this returns or raises. Returns a CopyResult.
    """
    checksum = BlockSum(checksum_algorithm, overlay=not zero_target)  # fails before any work without its library
    abort = Abort()
    stats = CopyStats()
    queue = WorkQueue(size, request_size, zero_target, stats, target, abort)
    throttle = Throttle(bandwidth) if bandwidth else None
    stop_reports = threading.Event()
    reporter = None
    sources = []
    threads = []
    workers = []
    try:
        for _connection in range(connections):
            sources.append(Connection(src_url, bitmap_context, io_timeout, abort, image_alone=image_alone))
        if report:
            total = planned_bytes(sources[0], size, zero_target)
            report(0, total)
            reporter = threading.Thread(target=_report_progress, args=(report, stats, total, stop_reports, abort),
                                        name="copy-progress")
            reporter.start()
        for index, source in enumerate(sources):
            workers.append(_Worker(source, target, queue, stats, requests, request_size, throttle,
                                   checksum.new_share()))
            threads.append(threading.Thread(target=workers[-1].run, name="copy-%d" % index))
            threads[-1].start()
        _join_by(threads, deadline, abort)
    except BaseException:
        abort.fail(Aborted())  # stops the threads; the exception itself goes on up
        raise
    finally:
        stop_reports.set()
        for thread in threads + ([reporter] if reporter else []):
            thread.join()  # prompt: every wait of a thread ends once the copy has failed
        for source in sources:
            source.close()
    if abort.error:
        raise abort.take()
    for worker in workers:
        checksum.add(worker.checksum)
    if report:
        report(stats.done, total)
    return CopyResult(stats.bytes_read, stats.bytes_zeroed, stats.bytes_clean, checksum.text())


def copy_to_image(src_url, path, image_format, size, bitmap_context=None, backing=None, backing_format="qcow2",
                  connections=4, requests=16, request_size=256 * 1024, io_timeout=IO_TIMEOUT, bandwidth=0,
                  report=None, deadline=None, image_alone=False, compression_level=None, encryption=None):
    """Copy into a new image at path: raw written with pwrite, qcow2 written directly, or with encryption (an
    Encryption) LUKS-encrypted qcow2 written through QEMU.

    backing is stored as given: keep it relative to the image's directory. bandwidth, report, deadline and
    image_alone: see copy(). compression_level: None, or the zstd level a qcow2 image's clusters are compressed with.

    The image is complete and durable when this returns. When it fails, the image it created is gone, and
    nothing that was at path before is ever touched. Returns a CopyResult.
    """
    try:
        if image_format == "raw":
            target = FileTarget(path, size)
        elif encryption is not None:
            target = EncryptedTarget(path, size, backing, backing_format, encryption)
        else:
            target = Qcow2Target(path, size, backing, backing_format, compression_level)
    except OSError as err:
        raise write_failure(path, err.strerror or err) from None
    try:
        try:
            result = copy(src_url, target, size, connections, bitmap_context, backing is None, requests,
                          request_size, io_timeout, bandwidth, report, image_alone, deadline=deadline)
            target.finish()
            return result
        finally:
            target.close()
    except BaseException as err:
        remove_file(path)  # ours: the target above created it
        if isinstance(err, OSError):
            raise write_failure(path, err.strerror or err) from None
        raise


def checksum_of_image_export(src_url, has_backing, algorithm, connections=4, io_timeout=IO_TIMEOUT):
    """Read an image exported alone (without its backing file, with qemu:allocation-depth) to sum its checksum.

    It is summed with algorithm as the copy that wrote the image summed it: what the image holds as data is
    read, its zero clusters count as blocks written as zeros when it is an overlay (has_backing), and what it
    does not hold counts for nothing. Returns the CopyResult: its checksum, and the bytes read.
    """
    size, connections = export_size_and_connections(src_url, None, connections, io_timeout)
    return copy(src_url, ChecksumOnly(), size, connections, zero_target=not has_backing, io_timeout=io_timeout,
                image_alone=True, checksum_algorithm=algorithm)
