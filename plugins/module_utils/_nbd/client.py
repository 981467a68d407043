# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The NBD client: a connection to an export that asks for the meta contexts a copy needs, and maps its extents.

No wait is unbounded. Every call that needs an answer from the server is asynchronous and polled: a server
that sends nothing for io_timeout seconds (IO_TIMEOUT by default) fails the call, and so does the failure
of the copy that the connection serves (Abort). libnbd's errors become NbdErrors that name the export and
the action, and say what to check (NbdErrorHandler).
"""

from __future__ import annotations

import threading

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import ErrorHandler, TranslatedError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import (
    CONTEXT_ALLOCATION,
    CONTEXT_ALLOCATION_DEPTH,
    STATUS_WINDOW,
    clip,
    merge_extents,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.libnbd import HAS_LIBNBD, nbd

# Seconds a server may send nothing before the copy fails. A healthy one answers in milliseconds; this
# outlasts stalls of busy storage (and a 32 MiB read at 1 MiB/s) and still fails a scheduled run in a minute.
IO_TIMEOUT = 60
# Waits wake this often (milliseconds) to see whether another thread has failed.
POLL_SLICE_MS = 100
ADVICE = ("check that the backup is started (src is the url that qemu_backup_start returned) and that the VM or "
          "qemu-nbd serving it is alive and not stopped, then copy again")
TLS_ADVICE = ("; over TLS, also that tls_certificates holds the fleet CA's ca-cert.pem and this host's client-cert.pem "
              "and client-key.pem, that the start allows that certificate's name (nbd_tcp.tls_allow; QEMU logs a "
              "refused one), and that the server's certificate names the address in src")


class NbdError(TranslatedError):
    """An NBD failure, phrased for the user; cause is libnbd's error when one was translated."""


class NbdTimeout(NbdError):
    """The server sent nothing for io_timeout seconds."""


class NbdErrorHandler(ErrorHandler):
    """libnbd's errors, as "Cannot <action> NBD export <url>: <reason>; <what to check>."

    Every message names the export and advises for its scheme (TLS for nbds://), so a connection translates
    with the handler bound to its export: for_export(url).
    """

    library_errors = (nbd.Error,) if HAS_LIBNBD else ()
    error = NbdError
    url = None
    advice = ADVICE

    @classmethod
    def for_export(cls, url, advice=ADVICE):
        """This handler, bound to the export at url, advising what to check with advice."""
        return type(cls.__name__, (cls,), dict(url=url, advice=advice))

    @classmethod
    def message(cls, action, reason):
        """The message for an action ("connect to", "read offset 0 of"...) on the export that failed for reason."""
        advice = cls.advice + (TLS_ADVICE if cls.url.startswith("nbds") else "")
        return "Cannot %s NBD export %s: %s; %s." % (action, cls.url, reason, advice)

    @classmethod
    def failure(cls, action, err):
        return cls.error(cls.message(action, cls.detail(err)), err)


class Abort:
    """The first failure (exception) of a copy. Once it is set, every thread stops issuing work and returns."""

    def __init__(self):
        self._lock = threading.Lock()
        self.error = None
        self.event = threading.Event()  # set with the failure: ends every sleep at once

    def fail(self, error):
        with self._lock:
            self.error = self.error or error
        self.event.set()

    def take(self):
        """Hand the failure over: kept here, its traceback's frames (which hold this) would make a cycle."""
        error, self.error = self.error, None
        return error


class Aborted(Exception):
    """The copy failed elsewhere (in another thread, or the caller was interrupted): this thread must stop."""


class Connection:
    """A connection to the export, asking for the contexts that the copy needs.

    Every wait on it ends once the server has sent nothing for io_timeout
    seconds, or as soon as the copy that it serves fails (abort). image_alone:
    the export is one image opened without its backing file (see Extent).
    """

    def __init__(self, url, bitmap_context=None, io_timeout=IO_TIMEOUT, abort=None, full_info=False,
                 image_alone=False, advice=ADVICE):
        self.url = url
        self.errors = NbdErrorHandler.for_export(url, advice)
        self.bitmap_context = bitmap_context
        self.io_timeout = io_timeout
        self.abort = abort
        self.image_alone = image_alone
        self.handle = nbd.NBD()
        self.handle.set_handle_name("fleetbackup-src")
        self.handle.set_uri_allow_local_file(True)  # tls-certificates=DIR, which the copy adds to an nbds:// URL
        self.handle.set_full_info(full_info)  # the export's description comes only with full info
        self.contexts = [c for c in (CONTEXT_ALLOCATION, CONTEXT_ALLOCATION_DEPTH, bitmap_context) if c]
        for context in self.contexts:
            self.handle.add_meta_context(context)
        try:
            # Not connect_uri: it waits forever for a server that accepts and never answers.
            self.errors.call("connect to", self.handle.aio_connect_uri, url)
            self.wait_until(lambda: not self.handle.aio_is_connecting(), "connect to")
            if not self.handle.can_meta_context(CONTEXT_ALLOCATION):
                raise NbdError("NBD export %s does not report base:allocation, so it cannot be copied sparsely: "
                               "export it from QEMU or qemu-nbd, which do." % url)
            if bitmap_context and not self.handle.can_meta_context(bitmap_context):
                raise NbdError("NBD export %s does not export the dirty bitmap context %s: pass the dirty_bitmap "
                               "that qemu_backup_start returned for this disk." % (url, bitmap_context))
            if image_alone and not self.handle.can_meta_context(CONTEXT_ALLOCATION_DEPTH):
                raise NbdError("NBD export %s does not report %s, so what the image itself holds is unknown: "
                               "export it with qemu-nbd -A." % (url, CONTEXT_ALLOCATION_DEPTH))
        except BaseException:
            self.close()  # now: the traceback, which holds this object, would keep the socket open
            raise
        self.contexts = [c for c in self.contexts if self.handle.can_meta_context(c)]

    def failure(self, action, reason):
        """The error for an action ("read offset 0 of"...) on the export that failed for reason, a sentence."""
        return NbdError(self.errors.message(action, reason))

    def wait_until(self, finished, action):
        """Poll until finished() is true: the server must show life every io_timeout seconds."""
        self.errors.call(action, self._poll_until, finished, action)

    def _poll_until(self, finished, action):
        idle_ms = 0
        while not finished():
            if self.abort is not None and self.abort.error:
                raise Aborted()
            # poll answers 0 only when its whole slice passed with nothing from the server.
            idle_ms = 0 if self.handle.poll(POLL_SLICE_MS) else idle_ms + POLL_SLICE_MS
            if idle_ms >= self.io_timeout * 1000:
                raise NbdTimeout(self.errors.message(action, "its server sent nothing for %g s. It is hung, or busy "
                                                             "with another client (qemu-nbd without --shared serves "
                                                             "one at a time)" % self.io_timeout))

    def description(self):
        """The export's description, or None when its server gave none (connect with full_info)."""
        try:
            return self.handle.get_export_description()
        except nbd.Error:  # libnbd's way to say there is none: nothing failed
            return None

    def read_now(self, length, offset):
        """Read length bytes at offset and wait for them, within io_timeout."""
        self._command_now("read offset %d of" % offset, self.handle.aio_pread, nbd.Buffer(length), offset)

    def write_now(self, buf, offset):
        """Write the nbd.Buffer buf at offset of a writable export and wait for it, within io_timeout."""
        self._command_now("write offset %d of" % offset, self.handle.aio_pwrite, buf, offset)

    def zero_now(self, offset, length):
        """Write zeros over [offset, offset+length) and wait. Without NO_HOLE, the server may store them as a hole;
        QEMU's qcow2 then marks the clusters zero, which hides a backing file's data as zeros must."""
        self._command_now("write zeros at offset %d of" % offset, self.handle.aio_zero, length, offset)

    def flush_now(self):
        """Make what was written on this connection durable."""
        self._command_now("flush", self.handle.aio_flush)

    def _command_now(self, action, command, *args):
        cookie = self.errors.call(action, command, *args)
        self.wait_until(lambda: self.handle.aio_command_completed(cookie), action)

    def read(self, buf, offset, completion):
        """Start reading len(buf) bytes at offset; libnbd calls completion(error) inside a later wait."""
        self.errors.call("read offset %d of" % offset, self.handle.aio_pread, buf, offset, completion)

    def extents(self, start, length):
        """Yield the merged Extents of [start, start+length), asked in bounded windows."""
        end = start + length
        offset = start
        while offset < end:
            replies = {context: [] for context in self.contexts}

            def collect(context, _offset, entries, _error):
                # libnbd passes a flat list: length, flags, length, flags...
                if context in replies:
                    replies[context].extend(zip(entries[0::2], entries[1::2]))
                return 0

            action = "get block status at offset %d of" % offset
            cookie = self.errors.call(action, self.handle.aio_block_status, min(STATUS_WINDOW, end - offset), offset,
                                      collect)
            self.wait_until(lambda: self.handle.aio_command_completed(cookie), action)
            extents = clip(merge_extents(offset, replies, self.bitmap_context, self.image_alone), end)
            if not extents:
                raise self.failure(action, "its server answered with no extent")
            yield from extents
            offset = extents[-1].start + extents[-1].length

    def close(self):
        """Say goodbye when idle, and close at once: a server that does not answer cannot hold this up."""
        if self.handle.aio_is_ready():
            self.handle.aio_disconnect(0)  # sent now; the server's answer is not awaited
        # The last reference to the handle: libnbd closes the socket and drops the callbacks of unanswered reads.
        self.handle = None


def export_size_and_connections(src_url, bitmap_context, wanted, io_timeout=IO_TIMEOUT):
    """Probe the export: its size, and how many connections it allows (1 without multi-conn)."""
    src = Connection(src_url, bitmap_context, io_timeout)
    try:
        return src.handle.get_size(), wanted if src.handle.can_multi_conn() else 1
    finally:
        src.close()
