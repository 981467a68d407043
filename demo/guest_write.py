"""Write as the demo VM's guest would: HMP qemu-io through the device, then flush. Usage: QMP_SOCKET DEVICE CMD..."""

import sys

from qemu.qmp.legacy import QEMUMonitorProtocol

socket_path, device, commands = sys.argv[1], sys.argv[2], sys.argv[3:]
monitor = QEMUMonitorProtocol(socket_path)
monitor.connect()
try:
    for command in commands + ["flush"]:
        output = monitor.cmd("human-monitor-command", **{"command-line": 'qemu-io -d %s "%s"' % (device, command)})
        if output.strip():
            sys.exit("qemu-io %s: %s" % (command, output))
finally:
    monitor.close()
