"""make bench, fleet part: backup_hypervisors.yml over the tests' SSH fleet, the repositories on each hypervisor or on
the backup host (every disk pulled over NBD with TLS).

Two hypervisors (an sshd each on 127.0.0.2 and .3, the backup host on .4; all of them this machine), each with two
QMP VMs per mode, each VM one disk of 2 GiB holding 512 MiB of data. Each mode has VMs of its own, found by their
socket pattern, so that each keeps one chain. In each round, each mode in turn (alternating the order): a full run of
the playbook, 1% of every disk dirtied through QMP, an incremental run. A VM's time is its host's span in the backup
play (its first task's start to its last task's end, from the tests' results callback) and its summary line's
seconds; every backup's image is compared with its disk.
"""

import os
import pathlib
import re
import statistics
import sys
import time

from support.fleet_tls import hypervisors_with_vm_dirs, pull_over_tls
from support.qemu_vm import DiskSpec, MiB, Vm, same
from support.ssh_fleet import SshFleet

from bench import ROOT, build_disk  # noqa: E402  (bench.py put the paths in place)

sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from test_fleet import line_of, manifest, run_fleet  # noqa: E402  (the fleet test's own runner, forks=8)

MODES = {
    "local": "on each hypervisor (copy over the unix socket)",
    "tls": "on the backup host (copy pulled over NBD+TLS)",
}
VMS_PER_HYPERVISOR = 2
WARM_UP = """- name: Prepare the hypervisors (their Python environments), untimed
  hosts: hypervisors
  gather_facts: false
  roles:
    - role: fleetbackup.qemu.qemu_hypervisor
"""
SUMMARY_LINE = re.compile(r": (full|incremental) (.+) in (\d+) s$")


class FleetBench:
    """The SSH fleet, each mode's VMs on it, and the variables that put each mode's repositories in place."""

    def __init__(self, workdir, size, data):
        self.workdir = pathlib.Path(workdir).resolve()  # sshd re-executes itself from /: absolute paths only
        self.size = size
        self.fleet = SshFleet(self.workdir).start()
        self.vms = {}  # mode: {repository name: Vm}
        self.settings = {}  # mode: (all_vars, vm_vars)
        try:
            self._prepare(data)
        except BaseException:
            self.stop()
            raise

    def _prepare(self, data):
        hypervisors_with_vm_dirs(self.fleet, self.workdir)
        tls_repository = self.workdir / "backup" / "repository"
        tls_repository.mkdir(mode=0o700)
        pull_over_tls(self.fleet, self.workdir, tls_repository)
        self.settings["tls"] = (dict(self.fleet.all_vars), dict(self.fleet.vm_vars))
        for name in self.fleet.hypervisors:
            (self.workdir / name / "repository").mkdir(mode=0o700)
        # Each VM's repository on its own hypervisor, which then runs the copies too.
        self.settings["local"] = ({}, dict(qemu_backup_repository=str(self.workdir / "{{ fleetbackup_hypervisor }}" /
                                                                      "repository")))
        for mode in MODES:
            self.vms[mode] = {}
            for hypervisor in self.fleet.hypervisors:
                for number in range(1, VMS_PER_HYPERVISOR + 1):
                    path = self.fleet.vm_dirs[hypervisor] / ("%s%d" % (mode, number))
                    path.mkdir()
                    vm = Vm(str(path), [DiskSpec("vda", size=self.size)])
                    build_disk(vm, "vda", self.size, data)  # offline, with qemu-io, before the start
                    self.vms[mode]["%s%d@%s" % (mode, number, hypervisor)] = vm.start()
        rc, _results, output = self.fleet.play(WARM_UP, forks=8)
        if rc != 0:
            raise SystemExit("the hypervisor role failed: %s" % output[-3000:])

    def use(self, mode):
        all_vars, vm_vars = self.settings[mode]
        self.fleet.all_vars.clear()
        self.fleet.all_vars.update(all_vars)
        self.fleet.vm_vars.clear()
        self.fleet.vm_vars.update(vm_vars)
        for hypervisor in self.fleet.hypervisors:
            self.fleet.hostvars[hypervisor]["fleetbackup_qmp_sockets"] = [
                str(self.fleet.vm_dirs[hypervisor] / (mode + "*") / "qmp.sock")]

    def repository(self, mode, name):
        if mode == "tls":
            return str(self.workdir / "backup" / "repository")
        return str(self.workdir / name.split("@")[1] / "repository")

    def dirty_one_percent(self, mode, pattern):
        """1% of each disk in 1 MiB writes spread over it, written as the guest would, through QMP."""
        writes = self.size // 100 // MiB
        for vm in self.vms[mode].values():
            for index in range(writes):
                vm.write("vda", (index * (self.size // writes)) // MiB * MiB, MiB, pattern)

    def run(self, mode, level):
        """One timed run of the fleet playbook, checked: {wall, play, vms: {name: {...}}}."""
        self.use(mode)
        os.sync()
        load = os.getloadavg()[0]
        began = time.monotonic()
        rc, results, output, summary = run_fleet(self.fleet, "-e", "qemu_backup_level=%s" % level)
        wall = time.monotonic() - began
        if rc != 0 or results["failures"]:
            raise SystemExit("the %s %s run failed: %s\n%s" % (mode, level, results["failures"], output[-4000:]))
        spans = results["spans"]
        others = {name for other in MODES if other != mode for name in self.vms[other]}
        if any(name not in spans for name in self.vms[mode]) or others & set(results["stats"]):
            raise SystemExit("the %s run did not back up exactly its own VMs: %s" % (mode, sorted(results["stats"])))
        vms = {}
        for name, vm in self.vms[mode].items():
            line = line_of(summary, name)
            found = SUMMARY_LINE.search(line)
            if not found or found.group(1) != level:
                raise SystemExit("%s: not a %s backup: %s" % (name, level, line))
            self.check(mode, name, vm, level)
            copies = results["tasks"][name]["Collect the results of the copies"]["results"]
            span = spans[name]
            vms[name] = dict(role=span["last"] - span["first"], summary=int(found.group(3)), tasks=span["ran"],
                             skipped=span["skipped"], copy=max(copy["elapsed"] for copy in copies),
                             bytes=sum(copy["bytes_read"] for copy in copies),
                             own=sum(seconds for _name, seconds, _skipped, _began in span["tasks"]))
        firsts = [spans[name]["first"] for name in self.vms[mode]]
        lasts = [spans[name]["last"] for name in self.vms[mode]]
        return dict(wall=wall, play=max(lasts) - min(firsts), vms=vms, load=load)

    def check(self, mode, name, vm, level):
        """The newest backup in the manifest is of this level, and its image (with its backing chain) is the disk."""
        repository = self.repository(mode, name)
        newest = manifest(repository, name)[-1]
        if newest["level"] != level:
            raise SystemExit("%s: the manifest's newest backup is %s, not %s" % (name, newest["level"], level))
        top = os.path.join(repository, name, next(d["file"] for d in newest["disks"] if d["disk"] == "vda"))
        if not same(top, vm.flushed_image("vda")):
            raise SystemExit("%s: the %s backup %s differs from the disk" % (name, level, top))

    def stop(self):
        for machines in self.vms.values():
            for vm in machines.values():
                vm.kill()
        self.fleet.stop()


def bench_fleet(workdir, size, data, rounds):
    """{mode: {level: [run]}}, each run as FleetBench.run returns it."""
    bench = FleetBench(workdir, size, data)
    results = {mode: {"full": [], "incremental": []} for mode in MODES}
    try:
        for round_index in range(rounds):
            modes = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
            for turn, mode in enumerate(modes):
                results[mode]["full"].append(bench.run(mode, "full"))
                bench.dirty_one_percent(mode, 0xB0 + 2 * round_index + turn)
                results[mode]["incremental"].append(bench.run(mode, "incremental"))
    finally:
        bench.stop()
    return results


def report_fleet(results, size, data, rounds):
    hypervisors = 2
    print()
    print("Fleet run: %d hypervisors x %d QMP VMs, each one %d MiB disk with %d MiB of data; backup_hypervisors.yml"
          " over SSH with -f 8; rounds: %d; medians over the rounds (and over the VMs for the per-VM columns):"
          % (hypervisors, VMS_PER_HYPERVISOR, size // MiB, data // MiB, rounds))
    print("| repository | run | whole run s | backup play s | per VM: role run s | per VM: its tasks s "
          "| per VM: summary line s | per VM: copy s | MiB read per VM |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    every_vm = [vm for levels in results.values() for runs in levels.values() for run in runs
                for vm in run["vms"].values()]
    for mode, levels in results.items():
        for level, runs in levels.items():
            per_vm = [vm for run in runs for vm in run["vms"].values()]

            def median(key, values=per_vm):
                return statistics.median(value[key] for value in values)

            print("| %s | %s | %.1f | %.1f | %.1f | %.1f | %.0f | %.2f | %.1f |" % (
                MODES[mode], level, median("wall", runs), median("play", runs), median("role"), median("own"),
                median("summary"), median("copy"), median("bytes") / MiB))
    loads = [run["load"] for levels in results.values() for runs in levels.values() for run in runs]
    tasks = sorted({(vm["tasks"], vm["skipped"]) for vm in every_vm})
    print("Load average (1 min) at the runs' starts: %.2f to %.2f." % (min(loads), max(loads)))
    print(EXPLANATION % dict(
        tasks=" or ".join("%d ran and %d skipped" % pair for pair in tasks),
        per_task=statistics.median((vm["own"] - vm["copy"]) / vm["tasks"] for vm in every_vm)))


EXPLANATION = """\
What a VM's time includes. Role run: its host's span in the backup play, from its first task's start to its last
task's end. Its tasks: the sum of its own tasks' times
(%(tasks)s), each a module sent over SSH to its hypervisor or
to the backup host and run there; the difference is time spent waiting for the other VMs' run of the same task
(the linear strategy runs a task on every VM, of both hypervisors, before the next task). Summary line:
the role's own seconds, from the plan to the record, whole seconds. Copy: the copy engine's time for the VM's
slowest disk. Beside the copy, a task costs %(per_task).2f s here (median of (its tasks - copy) / tasks ran). The whole
run adds ansible-playbook's start, the hypervisor role and the discovery on each hypervisor, and the summary."""
