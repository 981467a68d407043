# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A client for the QEMU guest agent (qemu-ga), on the host's socket of its virtio-serial port.

The agent speaks JSON commands and one-line JSON answers, with no greeting: qemu.qmp can't speak it.
The channel also keeps whatever an earlier client left (a half-sent command, answers nobody read), and it
holds our bytes until the agent opens the port: a booting guest answers once its agent starts. So every
session starts with guest-sync-delimited (a 0xFF byte first resets the agent's parser): the answer to it
comes after a 0xFF byte of the agent's, and everything before that is skipped. After a command that got no
answer in time, its late answer could pass for the next one's: the next command syncs first.

The socket serves one client at a time: a second client connects, but nothing answers it until the first
leaves. Every wait is bounded; every failure is a GuestAgentError whose message says what to do.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from collections import namedtuple

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError

DEFAULT_TIMEOUT = 10.0
DELIMITER = b"\xff"
EXEC_POLL_INTERVAL = 0.1

# exitcode or signal (the other None) of a command that guest-exec ran, and its output, decoded.
# truncated: the agent kept only the first part of the output (16 MiB a stream in QEMU 7.2).
ExecResult = namedtuple("ExecResult", "exitcode signal stdout stderr truncated")


class GuestAgentError(FleetbackupError):
    """A guest agent failure, phrased for the user."""


class GuestAgentUnreachable(GuestAgentError):
    """Nothing serves the socket: the VM is not running there."""


class GuestAgentTimeout(GuestAgentError):
    """The agent did not answer in time: it is not running, or another client holds the socket."""


class GuestAgentCommandError(GuestAgentError):
    """The agent answered a command with an error."""

    def __init__(self, socket_path, command, error_class, desc):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__("The guest agent on %s refused '%s': %s: %s" % (socket_path, command, error_class, desc))


class GuestAgent:
    """A session with the guest agent behind socket_path: connect(), commands, close()."""

    def __init__(self, socket_path, timeout=DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout
        self._socket = None
        self._received = b""
        self._synced = False

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc_info):
        self.close()

    def connect(self, timeout=None):
        """Connect and sync: returns once the agent answered, within timeout (default: the session's)."""
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._socket.settimeout(timeout or self.timeout)
            self._socket.connect(self.socket_path)
        except OSError as err:
            self.close()
            raise self._connect_error(err) from None
        self.sync(timeout)
        return self

    def _connect_error(self, err):
        if isinstance(err, FileNotFoundError):
            return GuestAgentUnreachable(
                "Guest agent socket %s does not exist: is the VM running, and is this the path of the chardev "
                "behind its virtserialport named org.qemu.guest_agent.0?" % self.socket_path)
        if isinstance(err, ConnectionRefusedError):
            return GuestAgentUnreachable("Nothing listens on guest agent socket %s: the VM behind it has stopped."
                                         % self.socket_path)
        if isinstance(err, PermissionError):
            return GuestAgentError("No permission to open guest agent socket %s: run as a user that may."
                                   % self.socket_path)
        return GuestAgentError("Cannot connect to guest agent socket %s: %s" % (self.socket_path, err))

    def close(self):
        if self._socket is not None:
            self._socket.close()
        self._socket = None
        self._received = b""
        self._synced = False

    def sync(self, timeout=None):
        """Drop whatever the channel holds from earlier, and wait until the agent answers."""
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        sync_id = random.randint(1, 2 ** 31 - 1)  # unlike the ids of syncs that earlier clients left unread
        self._synced = False
        self._send(DELIMITER, "guest-sync-delimited", {"id": sync_id}, timeout)
        while True:
            self._skip_to_delimiter(deadline, timeout)
            line = self._read_line(deadline, timeout, "guest-sync-delimited")
            try:
                answer = json.loads(line)
            except ValueError:
                continue  # debris after another delimiter: look for the next one
            if isinstance(answer, dict) and answer.get("return") == sync_id:
                self._synced = True
                return

    def execute(self, command, arguments=None, timeout=None):
        """Run one agent command and return its 'return' value."""
        timeout = timeout or self.timeout
        if not self._synced:
            self.sync(timeout)
        deadline = time.monotonic() + timeout
        self._send(b"", command, arguments, timeout)
        self._synced = False  # until the answer is read: a late one must not pass for the next command's
        line = self._read_line(deadline, timeout, command)
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not ("return" in answer or "error" in answer):
            raise GuestAgentError("The guest agent on %s answered '%s' with %r, which is no agent answer: is this "
                                  "the socket of the org.qemu.guest_agent.0 port?"
                                  % (self.socket_path, command, line[:200]))
        self._synced = True
        if "error" in answer:
            error = answer["error"]
            raise GuestAgentCommandError(self.socket_path, command, error.get("class"), error.get("desc"))
        return answer["return"]

    def ping(self, timeout=None):
        self.execute("guest-ping", timeout=timeout)

    def fsfreeze_status(self, timeout=None):
        """'frozen' or 'thawed'."""
        return self.execute("guest-fsfreeze-status", timeout=timeout)

    def fsfreeze_freeze(self, timeout=None):
        """Freeze the guest's file systems; how many. On a timeout they may be frozen: thaw them."""
        return self.execute("guest-fsfreeze-freeze", timeout=timeout)

    def fsfreeze_thaw(self, timeout=None):
        """Thaw the guest's file systems; how many were frozen."""
        return self.execute("guest-fsfreeze-thaw", timeout=timeout)

    def run(self, path, args=(), timeout=None, stdin=None):
        """Run a command in the guest (guest-exec) and wait until it exits: an ExecResult.

        path is looked up in the agent's PATH; stdin (bytes) is the command's input.
        """
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        arguments = {"path": path, "arg": list(args), "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode("ascii")
        pid = self.execute("guest-exec", arguments, timeout)["pid"]
        while True:
            status = self.execute("guest-exec-status", {"pid": pid}, max(deadline - time.monotonic(), 0.001))
            if status["exited"]:
                return ExecResult(status.get("exitcode"), status.get("signal"),
                                  base64.b64decode(status.get("out-data", "")),
                                  base64.b64decode(status.get("err-data", "")),
                                  status.get("out-truncated", False) or status.get("err-truncated", False))
            if time.monotonic() + EXEC_POLL_INTERVAL > deadline:
                raise GuestAgentTimeout("%s %s, run by the guest agent on %s (pid %d in the guest), did not finish "
                                        "within %s s; it may still be running there."
                                        % (path, " ".join(args), self.socket_path, pid, timeout))
            time.sleep(EXEC_POLL_INTERVAL)

    def _send(self, prefix, command, arguments, timeout):
        message = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._socket.settimeout(timeout)  # the channel holds bytes until the agent reads: it can fill up
        try:
            self._socket.sendall(prefix + json.dumps(message).encode() + b"\n")
        except socket.timeout:
            raise self._timeout(command, timeout) from None
        except OSError as err:
            raise GuestAgentError("Sending '%s' to the guest agent on %s failed: %s: did the VM stop?"
                                  % (command, self.socket_path, err)) from None

    def _skip_to_delimiter(self, deadline, timeout):
        while DELIMITER not in self._received:
            self._received = b""
            self._receive(deadline, timeout, "guest-sync-delimited")
        self._received = self._received.split(DELIMITER, 1)[1]

    def _read_line(self, deadline, timeout, command):
        while b"\n" not in self._received:
            self._receive(deadline, timeout, command)
        line, self._received = self._received.split(b"\n", 1)
        return line.decode("utf-8", errors="replace")

    def _receive(self, deadline, timeout, command):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout(command, timeout)
        self._socket.settimeout(remaining)
        try:
            data = self._socket.recv(65536)
        except socket.timeout:
            raise self._timeout(command, timeout) from None
        except OSError as err:
            raise GuestAgentError("Reading from the guest agent on %s failed during '%s': %s"
                                  % (self.socket_path, command, err)) from None
        if not data:
            raise GuestAgentError("The guest agent's socket %s closed during '%s': did the VM stop?"
                                  % (self.socket_path, command))
        self._received += data

    def _timeout(self, command, timeout):
        if command == "guest-sync-delimited":
            return GuestAgentTimeout(
                "The guest agent on %s did not answer within %s s: is qemu-guest-agent running in the guest? "
                "(A booting guest answers once it has started the agent. The socket serves one client at a time: "
                "another one may hold it.)" % (self.socket_path, timeout))
        return GuestAgentTimeout("The guest agent on %s did not answer '%s' within %s s: is qemu-guest-agent "
                                 "running in the guest?" % (self.socket_path, command, timeout))
