"""A fake QEMU guest agent for unit tests: a thread that serves the agent's protocol on a unix socket.

Like QEMU's chardev, it serves one client at a time: others connect, and wait. Like qemu-ga, it answers
each command with one JSON line, a 0xFF byte with a parse error, and guest-sync-delimited with a 0xFF byte
before its answer. What it received is in `commands`, in order.
"""

import base64
import json
import socket
import threading
import time

PARSE_ERROR = {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\\uFFFD'"}}


class AgentRefusal(Exception):
    """Raised by a handler: the agent answers with an error of this text."""


class FakeAgent:
    """Options:

    junk: bytes sent to each client first, as an earlier client's unread answers would be.
    silent: commands never answered. late: commands whose first answer comes only when the next bytes arrive.
    hang_up: commands on which the connection closes. raw_answers: command -> bytes sent instead of an answer.
    trickle: answers go out one byte at a time.
    exec_polls: how many guest-exec-status calls say "not exited" before the command's result.
    exec_result: what guest-exec's command returns: dict(exitcode=..., out=bytes, err=bytes) or signal=....
    """

    def __init__(self, socket_path, junk=b"", silent=(), late=(), hang_up=(), raw_answers=None, trickle=False,
                 exec_polls=0, exec_result=None):
        self.socket_path = socket_path
        self.junk = junk
        self.silent = set(silent)
        self.late = set(late)
        self.hang_up = set(hang_up)
        self.raw_answers = raw_answers or {}
        self.trickle = trickle
        self.exec_polls = exec_polls
        self.exec_result = exec_result or {"exitcode": 0}
        self.commands = []
        self.frozen = False
        self.handlers = {
            "guest-ping": lambda arguments: {},
            "guest-fsfreeze-status": lambda arguments: "frozen" if self.frozen else "thawed",
            "guest-fsfreeze-freeze": self._freeze,
            "guest-fsfreeze-thaw": self._thaw,
            "guest-exec": self._exec,
            "guest-exec-status": self._exec_status,
        }
        self._withheld = []
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(socket_path)
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self):
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()

    def _freeze(self, arguments):
        if self.frozen:
            raise AgentRefusal("Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state")
        self.frozen = True
        return 1

    def _thaw(self, arguments):
        was_frozen, self.frozen = self.frozen, False
        return 1 if was_frozen else 0

    def _exec(self, arguments):
        return {"pid": 4242}

    def _exec_status(self, arguments):
        if arguments["pid"] != 4242:
            raise AgentRefusal("Invalid parameter 'pid'")
        if self.exec_polls > 0:
            self.exec_polls -= 1
            return {"exited": False}
        status = {"exited": True}
        for key, name in (("exitcode", "exitcode"), ("signal", "signal")):
            if key in self.exec_result:
                status[name] = self.exec_result[key]
        for key, name in (("out", "out-data"), ("err", "err-data")):
            if self.exec_result.get(key):
                status[name] = base64.b64encode(self.exec_result[key]).decode()
        return status

    def _serve(self):
        while not self._stopping.is_set():
            try:
                connection, _address = self._listener.accept()
            except socket.timeout:
                continue
            with connection:
                try:
                    self._converse(connection)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # a client that gave up waiting for its turn, and left

    def _converse(self, connection):
        connection.settimeout(0.05)
        self._send(connection, self.junk)
        received = b""
        while not self._stopping.is_set():
            try:
                data = connection.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return
            for answer in self._withheld:
                self._send(connection, answer)
            self._withheld = []
            received += data
            while received:
                if received.startswith(b"\xff"):
                    received = received[1:]
                    self._send(connection, self._line(PARSE_ERROR))
                elif b"\n" in received:
                    line, received = received.split(b"\n", 1)
                    if not self._answer(connection, json.loads(line)):
                        return
                else:
                    break

    def _answer(self, connection, message):
        """Answer one command; False when the connection is to close."""
        command, arguments = message["execute"], message.get("arguments")
        self.commands.append((command, arguments))
        if command in self.hang_up:
            return False
        if command in self.silent:
            return True
        if command in self.raw_answers:
            answer = self.raw_answers[command]
        elif command == "guest-sync-delimited":
            answer = b"\xff" + self._line({"return": arguments["id"]})
        else:
            try:
                answer = self._line({"return": self.handlers[command](arguments)})
            except AgentRefusal as refusal:
                answer = self._line({"error": {"class": "GenericError", "desc": str(refusal)}})
        if command in self.late:
            self.late.discard(command)
            self._withheld.append(answer)
        else:
            self._send(connection, answer)
        return True

    @staticmethod
    def _line(message):
        return json.dumps(message).encode() + b"\n"

    def _send(self, connection, data):
        if self.trickle:
            for index in range(len(data)):
                connection.sendall(data[index:index + 1])
                time.sleep(0.001)  # so that the client's reads get pieces
        else:
            connection.sendall(data)
