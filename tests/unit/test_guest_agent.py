"""The guest agent client against a fake agent: sync through debris, bounded waits, errors a user can act on."""

import os
import socket
import time

import pytest

from fake_agent import FakeAgent

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import (
    ExecResult,
    GuestAgent,
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentTimeout,
    GuestAgentUnreachable,
)

NOT_RUNNING = "is qemu-guest-agent running in the guest?"


@pytest.fixture
def fake_agent(tmp_path):
    started = []

    def start(**options):
        agent = FakeAgent(str(tmp_path / ("qga-%d.sock" % len(started))), **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def connected(agent, timeout=2.0):
    return GuestAgent(agent.socket_path, timeout=timeout).connect()


def test_sync_skips_an_earlier_clients_debris(fake_agent):
    debris = b'{"return": {}}\n\xff{"return": 7}\n{"half": \xfe\xff not json\n\xff{"return": 8}\n{"retu'
    agent = fake_agent(junk=debris)
    client = connected(agent)
    client.ping()
    assert [command for command, arguments in agent.commands] == ["guest-sync-delimited", "guest-ping"]
    client.close()


def test_answers_that_arrive_in_pieces(fake_agent):
    agent = fake_agent(trickle=True, junk=b"\x00junk\xff")
    client = connected(agent)
    assert client.fsfreeze_status() == "thawed"
    client.close()


def test_freeze_and_thaw(fake_agent):
    agent = fake_agent()
    client = connected(agent)
    assert client.fsfreeze_freeze() == 1
    assert client.fsfreeze_status() == "frozen"
    with pytest.raises(GuestAgentCommandError, match="refused 'guest-fsfreeze-freeze': GenericError: .*frozen state"):
        client.fsfreeze_freeze()
    assert client.fsfreeze_thaw() == 1
    assert client.fsfreeze_status() == "thawed"
    client.close()


def test_run_polls_until_the_command_exits(fake_agent):
    agent = fake_agent(exec_polls=3, exec_result=dict(exitcode=3, out=b"hello\n\x00bytes", err=b"oops"))
    with GuestAgent(agent.socket_path, timeout=2.0) as client:
        result = client.run("cat", ["/data/checksums.log"], stdin=b"in")
    assert result == ExecResult(3, None, b"hello\n\x00bytes", b"oops", False)
    command, arguments = agent.commands[1]
    assert command == "guest-exec" and arguments == {
        "path": "cat", "arg": ["/data/checksums.log"], "capture-output": True, "input-data": "aW4="}
    assert [command for command, arguments in agent.commands[2:]] == ["guest-exec-status"] * 4


def test_a_command_killed_by_a_signal(fake_agent):
    agent = fake_agent(exec_result=dict(signal=9))
    with GuestAgent(agent.socket_path, timeout=2.0) as client:
        assert client.run("sleep", ["100"]) == ExecResult(None, 9, b"", b"", False)


def test_run_gives_up_at_its_timeout(fake_agent):
    agent = fake_agent(exec_polls=1000)
    client = connected(agent)
    started = time.monotonic()
    with pytest.raises(GuestAgentTimeout, match=r"sleep 100, run by the guest agent on .* \(pid 4242 in the guest\), "
                                                r"did not finish within 0.5 s"):
        client.run("sleep", ["100"], timeout=0.5)
    assert time.monotonic() - started < 1.5
    client.close()


def test_a_silent_agent_times_out_saying_what_to_check(fake_agent):
    agent = fake_agent(silent={"guest-sync-delimited"})
    started = time.monotonic()
    with pytest.raises(GuestAgentTimeout) as raised:
        GuestAgent(agent.socket_path, timeout=0.3).connect()
    assert time.monotonic() - started < 1.5
    assert "The guest agent on %s did not answer within 0.3 s: %s" % (agent.socket_path, NOT_RUNNING) \
        in str(raised.value)


def test_a_command_without_an_answer_times_out(fake_agent):
    agent = fake_agent(silent={"guest-fsfreeze-freeze"})
    client = connected(agent)
    with pytest.raises(GuestAgentTimeout, match="did not answer 'guest-fsfreeze-freeze' within 0.2 s: %s" % NOT_RUNNING):
        client.fsfreeze_freeze(timeout=0.2)
    client.close()


def test_a_late_answer_never_passes_for_the_next_one(fake_agent):
    agent = fake_agent(late={"guest-fsfreeze-freeze"})
    client = connected(agent)
    with pytest.raises(GuestAgentTimeout):
        client.fsfreeze_freeze(timeout=0.2)  # it answers 1 once more bytes arrive: after our next command
    assert client.fsfreeze_status() == "frozen"  # not the late 1
    assert [command for command, arguments in agent.commands] == [
        "guest-sync-delimited", "guest-fsfreeze-freeze", "guest-sync-delimited", "guest-fsfreeze-status"]
    client.close()


def test_a_second_client_waits_and_is_told_why(fake_agent):
    agent = fake_agent()
    first = connected(agent)
    with pytest.raises(GuestAgentTimeout, match="serves one client at a time: another one may hold it"):
        GuestAgent(agent.socket_path, timeout=0.3).connect()
    first.ping()
    first.close()


def test_the_agent_going_away(fake_agent):
    agent = fake_agent(hang_up={"guest-ping"})
    client = connected(agent)
    with pytest.raises(GuestAgentError, match="socket .* closed during 'guest-ping': did the VM stop?"):
        client.ping()
    client.close()


def test_an_answer_that_is_no_agents(fake_agent):
    agent = fake_agent(raw_answers={"guest-ping": b"Welcome to the console\n"})
    client = connected(agent)
    with pytest.raises(GuestAgentError, match="answered 'guest-ping' with 'Welcome to the console', which is no agent "
                                              "answer: is this the socket of the org.qemu.guest_agent.0 port?"):
        client.ping()
    assert client.fsfreeze_status() == "thawed"  # after a resync
    client.close()


def test_no_socket(tmp_path):
    with pytest.raises(GuestAgentUnreachable, match="qga.sock does not exist: is the VM running"):
        GuestAgent(str(tmp_path / "qga.sock")).connect()


def test_nothing_listening(tmp_path):
    path = str(tmp_path / "qga.sock")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(path)
    try:
        with pytest.raises(GuestAgentUnreachable, match="Nothing listens on guest agent socket .*qga.sock"):
            GuestAgent(path).connect()
    finally:
        bound.close()
        os.unlink(path)
