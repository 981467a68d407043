"""An inventory of test VMs on this machine, a repository, and runs of the collection's playbooks."""

import json
import os

from support.flows import assert_no_leftovers
from support.modules import ansible_bin, run_playbook
from support.paths import COLLECTIONS
from support.qemu_vm import DiskSpec, MiB, Vm

CLUSTER = 65536

PLAYBOOKS = os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "playbooks")


class Fleet:
    """An inventory of VMs on this machine, a repository, and runs of the collection's playbooks."""

    def __init__(self, tmp_path, vms):
        self.tmp_path = tmp_path
        self.vms = vms
        self.repository = tmp_path / "repository"
        self.repository.mkdir(exist_ok=True)
        self.scratch = tmp_path / "scratch"
        self.scratch.mkdir(exist_ok=True)
        self.inventory = tmp_path / "inventory.json"
        self.runs = 0
        hosts = {name: host_vars(vm) for name, vm in vms.items()}
        controller = {"fleetbackup_report_dir": str(tmp_path / "reports")}  # the run report, in the test's directory
        self.inventory.write_text(json.dumps({"all": {"vars": controller}, "vms": {"hosts": hosts, "vars": {
            "ansible_connection": "local",
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
            "qemu_backup_repository": str(self.repository),
            "qemu_backup_scratch_dir": str(self.scratch),
            "qemu_backup_state_dir": str(tmp_path / "state"),
        }}}))

    def run(self, playbook, check=False, at_task=None, **extra_vars):
        self.runs += 1
        return run_playbook(os.path.join(PLAYBOOKS, playbook), str(self.inventory),
                            str(self.tmp_path / ("results-%d.json" % self.runs)), extra_vars, check=check,
                            at_task=at_task)

    def command(self, playbook, directory, **extra_vars):
        """argv of a whole other ansible-playbook run of a playbook, for a hook; its outcome lands in directory."""
        directory.mkdir()
        return ["sh", "-c", 'env -u AT_TASK -u AT_TASK_COMMAND RESULTS_FILE="$1/results.json" "$2" "$3" -i "$4" '
                '-e "$5" > "$1/output" 2>&1; echo $? > "$1/rc"', "run", str(directory),
                ansible_bin("ansible-playbook"), os.path.join(PLAYBOOKS, playbook), str(self.inventory),
                json.dumps(extra_vars)]

    @staticmethod
    def outcome(directory):
        """(rc, results) of a run that command() started."""
        with open(directory / "results.json") as stream:
            return int((directory / "rc").read_text()), json.load(stream)

    def backup(self, check=False, at_task=None, **extra_vars):
        return self.run("fleet_backup.yml", check=check, at_task=at_task, **extra_vars)

    def restore(self, vm, dest, **extra_vars):
        return self.run("restore.yml", qemu_restore_dest=str(dest), fleet_group=vm, **extra_vars)

    def manifest(self, vm):
        with open(self.repository / vm / "manifest.json") as stream:
            return json.load(stream)

    def images(self, vm):
        return sorted(name for name in os.listdir(self.repository / vm) if name.endswith(".qcow2"))


def host_vars(vm):
    """The backup role's variables that name a VM: its QMP socket, or its libvirt domain."""
    variables = {"qemu_backup_" + key: value for key, value in vm.connection_args().items()}
    if "qemu_backup_domain" in variables:
        variables["qemu_backup_scratch_dir"] = ""  # QEMU under libvirt cannot enter the test's private directory
    return variables


def assert_ok(result, changed=None):
    rc, results, output = result
    assert rc == 0 and not results["failures"], output[-4000:]
    if changed is not None:
        assert {h: s["changed"] for h, s in results["stats"].items()} == changed, output[-4000:]
    return results


def assert_clean(vm):
    assert_no_leftovers(vm)


def two_disk_chain(workdir, backups, **role_vars):
    """A running VM of two disks and a chain of `backups` backups (a full, then incrementals) by the backup role with
    role_vars, in workdir: (vm, fleet). Each incremental's vda holds a data cluster of zeros that hides the full's data, and its vdb
    zero clusters that hide the full's."""
    (workdir / "vm").mkdir()
    vm = Vm(str(workdir / "vm"), [DiskSpec("vda"), DiskSpec("vdb")])
    vm.write("vda", 0, CLUSTER, 0x11)
    vm.write("vda", MiB, CLUSTER, 0x22)
    vm.write("vdb", 2 * MiB, 3 * MiB, 0x33)
    vm.start()
    try:
        fleet = Fleet(workdir, {"vm1": vm})
        for step in range(backups):
            assert_ok(fleet.backup(**role_vars))
            vm.write("vda", (step + 4) * MiB, MiB, 0x40 + step)
            vm.zero("vdb", 2 * MiB + step * MiB, CLUSTER)  # an overlay hides these with zero clusters
            if step == 0:
                vm.write("vda", 0, CLUSTER, 0x00)  # and this, the full's 0x11, with a data cluster of zeros
    except BaseException:
        vm.kill()
        raise
    return vm, fleet
