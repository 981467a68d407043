"""The demo guest's agent: wait until it answers, or run a command in the guest and print what it printed.

Usage: guest_agent.py AGENT_SOCKET wait | AGENT_SOCKET run PROGRAM [ARG...]
"""

import sys

from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import GuestAgent

socket_path, action, command = sys.argv[1], sys.argv[2], sys.argv[3:]
# A booting guest answers once qemu-ga runs: the first sync waits for it.
with GuestAgent(socket_path, timeout=120) as agent:
    if action == "run":
        result = agent.run(command[0], command[1:])
        sys.stdout.write(result.stdout.decode())
        sys.stderr.write(result.stderr.decode())
        sys.exit(result.exitcode if result.exitcode is not None else 1)
