# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A synchronous QMP client: one way to run commands and to wait for events.

Every failure is raised as QmpError with a message a user can act on.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError

try:
    from qemu.qmp import EventListener, QMPClient
    from qemu.qmp.protocol import ConnectError
    from qemu.qmp.qmp_client import ExecuteError, ExecInterruptedError
    HAS_QEMU_QMP = True
    QEMU_QMP_IMPORT_ERROR = None
except ImportError as import_error:
    HAS_QEMU_QMP = False
    QEMU_QMP_IMPORT_ERROR = import_error

DEFAULT_TIMEOUT = 10.0


class QmpError(FleetbackupError):
    """A QMP failure, phrased for the user."""


class QmpUnreachable(QmpError):
    """Nothing serves the socket: the VM is not running there."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error."""

    def __init__(self, command, error_class, desc):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__("QMP command '%s' failed: %s: %s" % (command, error_class, desc))


class QmpClient:
    """A connected QMP monitor.

    Events are recorded from the moment of connection, so an event that a
    command triggers is never missed by a later wait_event().
    """

    def __init__(self, socket_path, timeout=DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._qmp = QMPClient("fleetbackup")
        self._events = EventListener()
        self._pending = []
        self._qmp.register_listener(self._events)

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _run(self, coroutine, timeout):
        return self._loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def connect(self):
        try:
            self._run(self._qmp.connect(self.socket_path), self.timeout)
        except asyncio.TimeoutError:
            raise QmpError(
                "QMP monitor %s accepted the connection but sent no greeting within %ss: "
                "it is busy with another client (libvirt holds its VMs' monitors). "
                "Give the VM a -qmp socket of its own for fleetbackup, or raise qmp_timeout."
                % (self.socket_path, self.timeout)) from None
        except ConnectError as err:
            unreachable = isinstance(err.exc, (FileNotFoundError, ConnectionRefusedError))
            raise (QmpUnreachable if unreachable else QmpError)(self._describe_connect_error(err)) from None

    def _describe_connect_error(self, err):
        cause = err.exc
        if isinstance(cause, FileNotFoundError):
            return ("The QMP socket %s (qmp_socket) does not exist: is the VM running, and is this the path "
                    "given to its -qmp option?" % self.socket_path)
        if isinstance(cause, ConnectionRefusedError):
            return "Nothing listens on the QMP socket %s (qmp_socket): the VM behind it has stopped." % self.socket_path
        if isinstance(cause, PermissionError):
            return "No permission to open the QMP socket %s (qmp_socket): run as a user that may." % self.socket_path
        if isinstance(cause, OSError):
            return "Cannot connect to the QMP socket %s (qmp_socket): %s" % (self.socket_path, cause)
        # A decoder's own words (a UTF-16 mark, a codec's position) mean nothing to the user: say what came.
        what = "it sent bytes that are not QMP's JSON greeting" if isinstance(cause, ValueError) else cause or err
        return ("%s (qmp_socket) did not answer as a QEMU QMP monitor (%s): check that it is a -qmp socket, "
                "not a serial console, HMP monitor or NBD socket." % (self.socket_path, what))

    def close(self):
        try:
            self._run(self._qmp.disconnect(), self.timeout)
        except Exception:  # pylint: disable=broad-except
            pass  # a monitor that already went away needs no goodbye
        finally:
            self._loop.close()

    def execute(self, command, arguments=None, timeout=None):
        """Run one QMP command and return its 'return' value."""
        try:
            return self._run(self._qmp.execute(command, arguments or None), timeout or self.timeout)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, str(err)) from None
        except asyncio.TimeoutError:
            raise QmpError("QMP command '%s' got no answer within %ss." % (command, timeout or self.timeout)) from None
        except ExecInterruptedError:
            raise QmpError("QEMU closed the QMP connection during '%s': did the VM stop?" % command) from None

    def execute_with_fd(self, fd, command, arguments):
        """Hand QEMU a file descriptor (SCM_RIGHTS) for the command that takes it: add-fd or getfd."""
        self._qmp.send_fd_scm(fd)
        return self.execute(command, arguments)

    def peer_pid(self):
        """The PID of the QEMU process behind the monitor, from the kernel (SO_PEERCRED)."""
        sock = self._qmp._writer.transport.get_extra_info("socket")  # pylint: disable=protected-access
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]

    def peer_file_uid(self):
        """The uid with which the QEMU process behind the monitor opens files now (after any -runas).

        The uid it holds at connect time may be root's, so it is read from /proc while the connection holds its PID.
        """
        pid = self.peer_pid()
        with open("/proc/%d/status" % pid) as stream:
            for line in stream:
                if line.startswith("Uid:"):
                    return int(line.split()[4])  # real, effective, saved, file system
        raise QmpError("Cannot tell which user QEMU (pid %d) runs as." % pid)

    def transaction(self, actions):
        """Run actions atomically: all of them take effect, or none."""
        return self.execute("transaction", {"actions": [{"type": kind, "data": data} for kind, data in actions]})

    def wait_event(self, names, timeout=None, **match):
        """Wait for an event named in `names` (one name or a tuple) whose data holds every
        key=value in match; return the event."""
        names = (names,) if isinstance(names, str) else tuple(names)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for event in self._pending:
                if self._matches(event, names, match):
                    self._pending.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError("QEMU did not send %s for %s within %ss."
                               % (" or ".join(names), match, timeout or self.timeout))
            try:
                self._pending.append(dict(self._run(self._events.get(), remaining)))
            except asyncio.TimeoutError:
                continue

    @staticmethod
    def _matches(event, names, match):
        data = event.get("data", {})
        return event["event"] in names and all(data.get(key) == value for key, value in match.items())
