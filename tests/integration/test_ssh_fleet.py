"""The fleet over SSH: hypervisors reached through sshds of the test's own, and the hypervisor role."""

import json
import os
import re
import subprocess

from support.fleet import assert_clean, assert_ok
from support.qemu_vm import DiskSpec, MiB, same
from support.ssh_fleet import BOOTSTRAP_PYTHON

WHERE_PLAY = """
- name: Where do the modules run
  hosts: all
  gather_facts: false
  tasks:
    - name: Read the session's environment
      ansible.builtin.command: printenv FLEETBACKUP_TEST_HOST SSH_CONNECTION
      changed_when: false
"""

PREPARE_PLAY = """
- name: Prepare the hypervisors
  hosts: hypervisors
  gather_facts: false
  roles:
    - role: fleetbackup.qemu.qemu_hypervisor
"""

# The backup and restore roles get no interpreter and no state_dir: the hypervisor role hands them over.
BACKUP_PLAY = """
- name: Prepare the hypervisors, then back up and restore their VMs
  hosts: hypervisors
  gather_facts: false
  roles:
    - role: fleetbackup.qemu.qemu_hypervisor
    - role: fleetbackup.qemu.qemu_backup
    - role: fleetbackup.qemu.qemu_restore

- name: Later plays too, on other hosts delegating to a hypervisor
  hosts: backup_hosts
  gather_facts: false
  tasks:
    - name: Describe a VM through its hypervisor
      fleetbackup.qemu.qemu_backup_info:
        qmp_socket: "{{ hostvars['hv1'].qemu_backup_qmp_socket }}"
        state_dir: "{{ hostvars['hv1'].qemu_hypervisor_state_dir }}"
      delegate_to: hv1
"""

UNPREPARED_PLAY = """
- name: Back up without the hypervisor role
  hosts: hypervisors
  gather_facts: false
  roles:
    - role: fleetbackup.qemu.qemu_backup
"""


def ran_over_ssh(output, server, module, python=None):
    """Whether ansible-playbook -vvv ran the module on that sshd through the ssh program, with that python."""
    return re.search(r"<%s> SSH: EXEC ssh .*-o Port=%d .*'%s \S+/AnsiballZ_%s\.py" % (
        re.escape(server.address), server.port, re.escape(python) if python else r"\S+", module), output)


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
        assert ran_over_ssh(output, server, "command"), output[-3000:]
    assert "ESTABLISH LOCAL CONNECTION" not in output


def test_the_hypervisor_role_prepares_each_host_and_hands_its_python_to_the_backup_role(ssh_fleet, vms, tmp_path):
    machines = {}
    for name, vm_name, pattern in (("hv1", "web", 0x31), ("hv2", "db", 0x32)):
        machines[name] = vm = vms([DiskSpec("vda")], name=vm_name, under=ssh_fleet.vm_dirs[name],
                                  prepare=lambda vm, p=pattern: vm.write("vda", MiB, 2 * MiB, p))
        host = tmp_path / name
        ssh_fleet.hostvars[name].update(
            qemu_hypervisor_venv=str(host / "venv"), qemu_hypervisor_state_dir=str(host / "state"),
            qemu_backup_vm=vm_name, qemu_backup_qmp_socket=vm.qmp_socket,
            qemu_backup_repository=str(host / "repository"), qemu_restore_dest=str(host / "restored"))

    first = assert_ok(ssh_fleet.play(PREPARE_PLAY))
    for name in machines:
        tasks, host = first["tasks"][name], tmp_path / name
        assert tasks["Install the Debian packages the modules need"]["changed"] is False  # this machine has them
        assert tasks["Make the modules' Python environment, which sees python3-libnbd, with qemu.qmp in it"]["changed"]
        assert tasks["Create fleetbackup's private directory"]["changed"]
        state = os.stat(host / "state")
        assert (state.st_uid, state.st_mode & 0o7777) == (0, 0o700)
        subprocess.run([str(host / "venv" / "bin" / "python"), "-c", "import nbd, qemu.qmp"], check=True)
    # Prepared: one check, and the interpreter handed over; apt and pip are not run.
    again = assert_ok(ssh_fleet.play(PREPARE_PLAY), changed={"hv1": 0, "hv2": 0})
    for name in machines:
        assert [task.split(" : ", 1)[-1] for task, _seconds, skipped, _began in again["spans"][name]["tasks"]
                if not skipped] == [
            "Validating arguments against arg spec 'main' - Prepare a Debian hypervisor for fleetbackup's modules",
            "Check whether this host is prepared already",
            "Run the collection's modules on this host with the environment's python from now on"]
    # A doubt, here a private directory that others may enter, and it is all done again, and repaired.
    os.chmod(tmp_path / "hv1" / "state", 0o755)
    repaired = assert_ok(ssh_fleet.play(PREPARE_PLAY), changed={"hv1": 1, "hv2": 0})
    assert repaired["tasks"]["hv1"]["Create fleetbackup's private directory"]["changed"]
    assert "Install the Debian packages the modules need" in repaired["tasks"]["hv1"]
    assert os.stat(tmp_path / "hv1" / "state").st_mode & 0o7777 == 0o700

    marks = {name: vm.mark("vda") for name, vm in machines.items()}
    rc, results, output = ssh_fleet.play(BACKUP_PLAY, "-vvv")
    assert_ok((rc, results, output))
    for name, vm in machines.items():
        host, server, vm_name = tmp_path / name, ssh_fleet.servers[name], ssh_fleet.hostvars[name]["qemu_backup_vm"]
        # The backup role's modules ran through SSH to this host, with the python the hypervisor role made.
        assert ran_over_ssh(output, server, "qemu_backup", str(host / "venv" / "bin" / "python")), output[-3000:]
        with open(host / "repository" / vm_name / "manifest.json") as stream:
            assert [b["level"] for b in json.load(stream)["backups"]] == ["full"]
        assert os.listdir(host / "state" / "vms")  # the modules used the state_dir the hypervisor role made
        expected = vm.expected_image("vda", marks[name], str(host / "expected.raw"))
        assert same(str(host / "restored" / "vda.qcow2"), expected)
        assert_clean(vm)

    # The backup host's own python lacks qemu.qmp: the delegated task ran with hv1's.
    assert [d["disk"] for d in results["tasks"]["backup"]["Describe a VM through its hypervisor"]["disks"]] == ["vda"]

    # The interpreter is a fact of the run that ran the role: a run without it has Debian's python, which
    # lacks qemu.qmp.
    rc, results, output = ssh_fleet.play(UNPREPARED_PLAY)
    assert rc != 0, output[-3000:]
    for name in machines:
        failure = " ".join(results["failures"][name])
        assert "qemu.qmp" in failure and BOOTSTRAP_PYTHON in failure, failure
