"""The fleet over SSH: hypervisors reached through sshds of the test's own, and the hypervisor role."""

import re

from support.fleet import assert_ok

WHERE_PLAY = """
- name: Where do the modules run
  hosts: all
  gather_facts: false
  tasks:
    - name: Read the session's environment
      ansible.builtin.command: printenv FLEETBACKUP_TEST_HOST SSH_CONNECTION
      changed_when: false
"""


def test_ansible_reaches_each_host_over_ssh_and_runs_its_modules_there(ssh_fleet):
    rc, pings, output = ssh_fleet.adhoc("hypervisors", "ansible.builtin.ping")
    assert rc == 0, output[-3000:]
    assert {name: result["ping"] for name, result in pings.items()} == {"hv1": "pong", "hv2": "pong"}

    # Every host is this machine, so files prove nothing: the module's own session does. sshd gives it the
    # host's name (SetEnv) and SSH_CONNECTION "client-address client-port server-address server-port".
    rc, results, output = ssh_fleet.play(WHERE_PLAY, "-vvv")
    assert_ok((rc, results, output))
    for name, server in ssh_fleet.servers.items():
        host, connection = results["tasks"][name]["Read the session's environment"]["stdout_lines"]
        assert host == name and connection.split()[2:] == [server.address, str(server.port)]
        assert server.accepted_logins(), server.log_lines
        assert "<%s> ESTABLISH SSH CONNECTION FOR USER: root" % server.address in output
        assert re.search(r"<%s> SSH: EXEC ssh .*-o Port=%d .*AnsiballZ_command\.py" % (re.escape(server.address),
                                                                                      server.port), output)
    assert "ESTABLISH LOCAL CONNECTION" not in output
