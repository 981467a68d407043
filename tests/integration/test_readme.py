"""The README's examples, run as written: its playbooks and commands are read from README.md, and only paths (and
the backup name a command names) are replaced with the test's own. A substitution whose text the README no longer
holds fails the test, so an example cannot change unnoticed.

The roles run alone here: the restore, verify and drill plays get an inventory with no qemu_backup_* variable.
"""

import json
import os
import re
import shlex
import subprocess

import yaml

from support.certificates import HYPERVISOR_ADDRESS
from support.fleet import Fleet
from support.guest import BootedGuestVm
from support.modules import ansible_bin, ansible_env
from support.paths import ROOT
from support.qemu_vm import DiskSpec, MiB, same


def readme_blocks(heading):
    """The fenced code blocks under a heading of README.md, up to the next heading, in order."""
    with open(os.path.join(ROOT, "README.md")) as stream:
        lines = stream.read().splitlines()
    blocks, block = [], None
    for line in lines[lines.index(heading) + 1:]:
        if line.startswith("```"):
            if block is not None:
                blocks.append("".join(block))
            block = None if block is not None else []
        elif block is not None:
            block.append(line + "\n")
        elif line.startswith("#"):
            break
    return blocks


def substituted(text, replacements):
    for old, new in replacements:
        assert old in text, "the README's example no longer holds %r" % old
        text = text.replace(old, new)
    return text


def commands(block):
    """The commands of a sh block: continuation lines joined, comments dropped."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def run(argv, cwd, inventory=None):
    """An ansible or ansible-playbook command as the README types it, with the venv's program; (rc, output)."""
    assert argv[0] in ("ansible", "ansible-playbook"), argv
    env = ansible_env()
    if inventory:  # for a command that names no inventory, as a user's ansible.cfg would give it
        env["ANSIBLE_INVENTORY"] = str(inventory)
    process = subprocess.run([ansible_bin(argv[0])] + argv[1:], cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, universal_newlines=True, timeout=900, check=False)
    return process.returncode, process.stdout


def assert_ran(result):
    rc, output = result
    assert rc == 0, output[-4000:]
    return output


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def local_hosts(tmp_path, *names):
    """An inventory of hosts on this machine and nothing else: no variable of any role."""
    local = dict(ansible_connection="local", ansible_python_interpreter="{{ ansible_playbook_python }}")
    return write_yaml(tmp_path / "alone.yml", {"all": {"hosts": {name: dict(local) for name in names}}})


def test_the_fleet_restore_and_verify_examples_run_as_written(vms, tmp_path):
    machines = {}
    for number, name in enumerate(("web1", "db1", "mail")):
        machines[name] = vms([DiskSpec("vda")], name=name)
        machines[name].write("vda", number * MiB, 2 * MiB, 0x41 + number)
    at_backup = {name: vm.mark("vda") for name, vm in machines.items()}
    repository = tmp_path / "backup"
    repository.mkdir()
    fleet_block, fleet_command = readme_blocks("### A fleet")
    fleet = yaml.safe_load(substituted(fleet_block, [("/backup", str(repository))] + [
        ("/run/vms/%s/qmp.sock" % name, vm.qmp_socket) for name, vm in machines.items()]))
    # The defaults' private directories and the run report's, in the test's own: the only variables the test adds
    # to the example.
    fleet["vms"]["vars"].update(qemu_backup_state_dir=str(tmp_path / "state"),
                                qemu_backup_scratch_dir=str(tmp_path / "scratch"))
    fleet["all"] = {"vars": {"fleetbackup_report_dir": str(tmp_path / "reports")}}
    os.mkdir(tmp_path / "scratch", 0o700)
    write_yaml(tmp_path / "fleet.yml", fleet)
    (command,) = commands(fleet_command)
    assert_ran(run(command, tmp_path))
    newest = {}
    for name in machines:
        with open(repository / name / "manifest.json") as stream:
            newest[name] = json.load(stream)["backups"][-1]
        assert newest[name]["level"] == "full"

    restore_command, restore_play = readme_blocks("### Restore")
    dest = tmp_path / "web1-restored"
    (command,) = commands(substituted(restore_command, [("/var/lib/vms/web1-restored", str(dest)),
                                                        ("20261129T020000Z-3f2a", newest["web1"]["name"])]))
    assert_ran(run(command, tmp_path))
    expected = machines["web1"].expected_image("vda", at_backup["web1"], str(tmp_path / "web1-expected.raw"))
    assert same(str(dest / "vda.qcow2"), expected)
    assert sorted(os.listdir(repository)) == ["db1", "mail", "web1"]  # --limit web1: nothing else restored

    # The restore role alone: the play as written, on an inventory with no variable of the backup role.
    raw_dest = tmp_path / "web1-raw"
    play = write_yaml(tmp_path / "restore.yml", yaml.safe_load(substituted(restore_play, [
        ("/backup", str(repository)), ("/var/lib/vms/web1-restored", str(raw_dest))])))
    alone = local_hosts(tmp_path, "web1", "backup1")
    assert_ran(run(["ansible-playbook", "-i", str(alone), str(play)], tmp_path))
    assert same(str(raw_dest / "vda.raw"), expected)

    verify_fleet, verify_repository = commands(substituted(readme_blocks("### Verify")[0], [
        ("/backup", str(repository))]))
    output = assert_ran(run(verify_fleet, tmp_path))
    assert all(re.search(r"%s +: ok=\d+ +changed=0 .*failed=0" % name, output) for name in machines), output[-3000:]
    whole = assert_ran(run(verify_repository, tmp_path, inventory=alone))
    assert "backup1 | SUCCESS" in whole and '"changed": false' in whole
    # The same commands fail on a damaged image, naming it: they check something.
    image = repository / "mail" / newest["mail"]["disks"][0]["file"]
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a %d 512" % (2 * MiB), str(image)], check=True,
                   stdout=subprocess.DEVNULL)
    rc, output = run(verify_repository, tmp_path, inventory=alone)
    assert rc != 0 and "mail/%s" % newest["mail"]["disks"][0]["file"] in output and newest["mail"]["name"] in output
    rc, output = run(verify_fleet, tmp_path)
    assert rc != 0 and re.search(r"web1 +: ok=\d+ +changed=0 .*failed=0", output) and re.search(
        r"mail +: .*failed=1", output), output[-3000:]


def test_the_roles_alone_say_which_variable_is_missing(tmp_path):
    alone = local_hosts(tmp_path, "web1")
    for role, variables in (("qemu_restore", {"qemu_restore_dest": str(tmp_path / "dest")}),
                            ("qemu_verify", {}), ("qemu_drill", {})):
        play = write_yaml(tmp_path / ("%s.yml" % role), [{"hosts": "web1", "gather_facts": False, "roles": [
            {"role": "fleetbackup.qemu.%s" % role, "vars": variables}]}])
        rc, output = run(["ansible-playbook", "-i", str(alone), str(play)], tmp_path)
        assert rc != 0 and ("Set %s_repository (or the backup role's qemu_backup_repository) to the directory that "
                            "holds the VMs' backups" % role) in output, output[-3000:]
        assert "is undefined" not in output
    assert not (tmp_path / "dest").exists()


def test_the_drill_examples_run_as_written(vms, tmp_path):
    guest = vms([], name="web1", kind=BootedGuestVm)
    with guest.agent() as agent:  # waits for the boot
        assert agent.run("fbg-workload", ["start", "16"]).exitcode == 0
    fleet = Fleet(tmp_path, {"web1": guest})
    inventory = json.loads(fleet.inventory.read_text())
    inventory["vms"]["hosts"]["web1"]["qemu_backup_guest_agent_socket"] = guest.agent_socket
    inventory["vms"]["vars"]["qemu_drill_accel"] = "tcg"  # a booting guest hangs under these machines' KVM
    (tmp_path / "fleet.yml").write_text(json.dumps(inventory))
    assert fleet.backup()[0] == 0
    backup = fleet.manifest("web1")["backups"][-1]["name"]

    in_fleet, in_repository = commands(substituted(readme_blocks("### Restore drills")[0], [
        ("/usr/local/bin/check-app", "/bin/true"), ("/backup", str(fleet.repository))]))
    output = assert_ran(run(in_fleet, tmp_path))
    assert re.search(r"web1: PASS, backup %s booted in [0-9.]+ s, 1 file system\(s\), /bin/true exited 0" % backup,
                     output), output[-3000:]

    # The drill role alone: the repository's VMs become hosts with only qemu_drill_repository; the controller's
    # drills take accel from the environment's group_vars as a user's would.
    group_vars = tmp_path / "group_vars"
    group_vars.mkdir()
    write_yaml(group_vars / "all.yml", {"qemu_drill_accel": "tcg",
                                        "qemu_drill_state_dir": str(tmp_path / "drill-state")})
    empty = write_yaml(tmp_path / "hosts.yml", {"all": {"hosts": {}}})
    assert "-i" not in in_repository
    rc, output = run(in_repository, tmp_path, inventory=empty)
    assert rc == 0 and re.search(r"web1: PASS, backup %s booted" % backup, output), output[-3000:]
    assert os.listdir(tmp_path / "drill-state" / "drills") == []


def test_the_tls_example_runs_as_written(vms, tmp_path, fleet_certificates):
    certificates, _other = fleet_certificates
    vm = vms([DiskSpec("vda"), DiskSpec("vdb")], name="web1")
    vm.write("vda", 0, 3 * MiB, 0x51)
    vm.write("vdb", MiB, MiB, 0x52)
    at_start = {disk: vm.mark(disk) for disk in vm.disks}
    repository = tmp_path / "backup"
    (repository / "web1").mkdir(parents=True)
    block = next(block for block in readme_blocks("## Backups pulled off the hypervisor over TLS")
                 if "qemu_backup_copy" in block)
    # The two hosts share this machine: the hypervisor's credentials and the backup host's lie in two directories.
    server_dir, client_dir = certificates.tls_dir("hv1"), certificates.tls_dir("backup")
    block = block.replace("tls_dir: /etc/fleetbackup/tls", "tls_dir: " + server_dir, 1)
    play = yaml.safe_load(substituted(block, [
        ("tls_certificates: /etc/fleetbackup/tls", "tls_certificates: " + client_dir),
        ("/run/vms/web1/qmp.sock", vm.qmp_socket), ("/backup/web1/", "%s/web1/" % repository),
        ("CN=backup1", "CN=backup"), ("delegate_to: backup1", "delegate_to: backup")]))
    # The defaults' private directories, in the test's own, as module_defaults.
    os.mkdir(tmp_path / "scratch", 0o700)
    private = {"state_dir": str(tmp_path / "state")}
    play[0]["module_defaults"] = {
        "fleetbackup.qemu.qemu_backup_start": dict(private, scratch_dir=str(tmp_path / "scratch")),
        "fleetbackup.qemu.qemu_backup_copy": private, "fleetbackup.qemu.qemu_backup_stop": private}
    playbook = write_yaml(tmp_path / "tls.yml", play)
    local = dict(ansible_connection="local", ansible_python_interpreter="{{ ansible_playbook_python }}")
    inventory = write_yaml(tmp_path / "hosts.yml", {"all": {"children": {
        "hypervisors": {"hosts": {"hv1": dict(local, ansible_host=HYPERVISOR_ADDRESS)}},
        "backup_hosts": {"hosts": {"backup": dict(local)}}}}})
    output = assert_ran(run(["ansible-playbook", "-i", str(inventory), str(playbook)], tmp_path))
    assert "nbds://%s:" % HYPERVISOR_ADDRESS in output
    assert sorted(os.listdir(repository / "web1")) == ["vda.qcow2", "vdb.qcow2"]
    for disk in vm.disks:
        path = str(repository / "web1" / ("%s.qcow2" % disk))
        assert same(path, vm.expected_image(disk, at_start[disk], path + ".expected"))
    assert vm.leftovers()["exports"] == [] and vm.leftovers()["nodes"] == []
