"""A real fleet: hypervisors reached over SSH list no VMs in the inventory; every VM, running or stopped, QMP or
libvirt, is found on its hypervisor and backed up as a host of its own, in parallel; one that fails fails alone."""

import json
import os
import subprocess
import uuid

from support.fleet import assert_clean
from support.flows import vm_state_files
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB, same

PLAYBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "playbooks",
                        "backup_hypervisors.yml")
SUMMARY = "One line per VM, and one per hypervisor whose VMs could not be found"


def run_fleet(ssh_fleet, *args):
    with open(PLAYBOOK) as stream:
        rc, results, output = ssh_fleet.play(stream.read(), *args, forks=8)
    assert "localhost" in results["tasks"], output[-5000:]
    return rc, results, output, results["tasks"]["localhost"][SUMMARY]["msg"]


def line_of(summary, vm):
    lines = [line for line in summary if line.startswith(vm + ": ")]
    assert len(lines) == 1, (vm, summary)
    return lines[0]


def began(results, host, task):
    """When host's first run of the task (named without its role) started, by the results callback's clock."""
    return next(start for name, _seconds, _skipped, start in results["spans"][host]["tasks"]
                if name.split(" : ")[-1] == task)


def ended(results, host, task):
    """When host's first run of the task ended."""
    return next(start + seconds for name, seconds, _skipped, start in results["spans"][host]["tasks"]
                if name.split(" : ")[-1] == task)


def manifest(repository, vm):
    with open(os.path.join(repository, vm, "manifest.json")) as stream:
        return json.load(stream)["backups"]


def restores(vm, repository, name, backup, mark, tmp_path):
    """The repository's backup of vm's vda, flattened, is the disk as it was at mark."""
    top = os.path.join(repository, name, next(d["file"] for d in backup["disks"] if d["disk"] == "vda"))
    flat = str(tmp_path / ("%s-%s.raw" % (name, backup["name"])))
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", top, flat], check=True)
    return same(flat, vm.expected_image("vda", mark, str(tmp_path / ("exp-%s-%d.raw" % (name, mark)))))


def test_a_fleet_of_hypervisors_backs_up_every_vm_it_finds(ssh_fleet, vms, libvirt_daemon, domains, tmp_path):
    repository = str(tmp_path / "repository")  # one path, shared by both hypervisors (both are this machine)
    os.mkdir(repository, 0o700)
    for name in ("hv1", "hv2"):
        host = tmp_path / name
        os.makedirs(host / "state", mode=0o700)
        ssh_fleet.hostvars[name].update(qemu_hypervisor_venv=str(host / "venv"),
                                        qemu_hypervisor_state_dir=str(host / "state"),
                                        fleetbackup_qmp_sockets=[str(ssh_fleet.vm_dirs[name] / "*" / "qmp.sock")])
    daemon = libvirt_daemon()
    ssh_fleet.hostvars["hv2"].update(fleetbackup_libvirt_uri=daemon.uri, qemu_hypervisor_libvirt=True)
    ssh_fleet.all_vars["qemu_backup_repository"] = repository

    def disk(vm, pattern):
        vm.write("vda", 0, 2 * MiB, pattern)

    db_uuid = str(uuid.uuid4())
    machines = {
        "web@hv1": vms([DiskSpec("vda", size=16 * MiB)], name="web", under=ssh_fleet.vm_dirs["hv1"],
                       prepare=lambda vm: disk(vm, 0x11)),
        "db.%s" % db_uuid.replace("-", "")[:8]: vms([DiskSpec("vda", size=16 * MiB)], name="db", uuid=db_uuid,
                                                    under=ssh_fleet.vm_dirs["hv1"], prepare=lambda vm: disk(vm, 0x12)),
        "web@hv2": vms([DiskSpec("vda", size=16 * MiB)], name="web", under=ssh_fleet.vm_dirs["hv2"],
                       prepare=lambda vm: disk(vm, 0x13)),
    }
    app = domains(daemon, [DiskSpec("vda", size=16 * MiB)], name="app", prepare=lambda vm: disk(vm, 0x14))
    machines["%s.%s" % (app.name, app.uuid.replace("-", "")[:8])] = app
    # Stopped VMs: seen running by a module on their hypervisor, then shut down. "broken" gets another image.
    for name, hypervisor, pattern in (("old", "hv1", 0x15), ("broken", "hv2", 0x16)):
        vm = vms([DiskSpec("vda", size=16 * MiB)], name=name, under=ssh_fleet.vm_dirs[hypervisor],
                 prepare=lambda vm, p=pattern: disk(vm, p))
        seen = run_module("qemu_backup_info", qmp_socket=vm.qmp_socket,
                          state_dir=str(tmp_path / hypervisor / "state"))
        assert not seen.failed, seen
        vm.quit()
        machines["%s@%s" % (name, hypervisor)] = vm
    broken = machines["broken@hv2"]
    os.rename(broken.image("vda"), broken.image("vda") + ".moved")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", broken.image("vda"), str(16 * MiB)], check=True)
    backed_up = [name for name in machines if name != "broken@hv2"]

    points = [{name: vm.mark("vda") for name, vm in machines.items()}]
    rc, results, output, summary = run_fleet(ssh_fleet)
    assert rc != 0, output[-3000:]
    assert list(results["failures"]) == ["broken@hv2"], output[-4000:]
    assert "is not the file" in line_of(summary, "broken@hv2")
    for name in backed_up:
        assert " full " in line_of(summary, name), summary
    assert "(offline)" in line_of(summary, "old@hv1")
    # Each VM was a host of its own, backed up through its own hypervisor over SSH, the hypervisors side by side:
    # each VM began before the other's backup stopped.
    assert "web@hv1" in results["stats"] and "web@hv2" in results["stats"]
    for one, other in (("web@hv1", "web@hv2"), ("web@hv2", "web@hv1")):
        assert began(results, one, "Run the whole backup") < ended(results, other, "Run the whole backup")

    for name, vm in machines.items():
        if name != "old@hv1" and vm.pid is not None:
            vm.write("vda", 4 * MiB, MiB, 0x21)
    machines["old@hv1"].write("vda", 8 * MiB, MiB, 0x22)  # offline, with qemu-io: the persistent bitmap records it
    # The VM with a UUID moves to hv2 with its image (and the checkpoint in it): its chain goes on there, in the
    # same directory.
    db_name = "db.%s" % db_uuid.replace("-", "")[:8]
    db = machines[db_name]
    db.quit()
    moved_dir = ssh_fleet.vm_dirs["hv2"] / "db"
    moved_dir.mkdir()
    subprocess.run(["cp", "--sparse=always", db.image("vda"), str(moved_dir / "vda.qcow2")], check=True)
    moved = vms([DiskSpec("vda", size=16 * MiB)], name="db", uuid=db_uuid, under=ssh_fleet.vm_dirs["hv2"])
    moved.writes = db.writes  # the same disk: its write log goes on
    moved.write("vda", 6 * MiB, MiB, 0x24)
    machines[db_name] = moved
    points.append({name: vm.mark("vda") for name, vm in machines.items()})
    rc, results, output, summary = run_fleet(ssh_fleet)
    assert list(results["failures"]) == ["broken@hv2"], output[-4000:]
    for name in backed_up:
        assert " incremental " in line_of(summary, name), summary
    assert "(offline)" in line_of(summary, "old@hv1")
    # hv2 backed it up: its private state now records the moved VM's image.
    records = [os.path.join(root, "disks.json") for root, _dirs, files in os.walk(tmp_path / "hv2" / "state")
               if "disks.json" in files]
    assert any(str(moved_dir / "vda.qcow2") in open(record).read() for record in records)
    print("\n".join(summary))

    for name in backed_up:
        backups = manifest(repository, name)
        assert [b["level"] for b in backups] == ["full", "incremental"], name
        for point, backup in zip(points, backups):
            if name in point:
                assert restores(machines[name], repository, name, backup, point[name], tmp_path), (name, backup)
    assert not os.path.exists(os.path.join(repository, "broken@hv2", "manifest.json"))

    # Nothing left on any hypervisor.
    for name, vm in machines.items():
        if vm is app:
            assert not vm.domain.jobStats().get("operation") and len(vm.checkpoints()) == 1
        elif vm.pid is not None:
            assert_clean(vm)
    for hypervisor in ("hv1", "hv2"):
        assert vm_state_files(str(tmp_path / hypervisor / "state")) == []
