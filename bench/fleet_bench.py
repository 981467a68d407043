"""make bench, fleet part: backup_hypervisors.yml over the tests' SSH fleet, the repositories on each hypervisor or on
the backup host (every disk pulled over NBD with TLS), and what the fleet's Ansible settings save.

Two hypervisors (an sshd each on 127.0.0.2 and .3, the backup host on .4; all of them this machine), each with four
QMP VMs per mode, each VM one disk of 2 GiB holding 512 MiB of data. Each mode has VMs of its own, found by their
socket pattern, so that each keeps one chain. In each round, each mode in turn (alternating the order): a full run of
the playbook, 1% of every disk dirtied through QMP, an incremental run. Then the local mode's 1% incremental again
under each of the settings compared (pipelining, ControlPersist, forks), in turns. A VM's time is its host's span in
the backup play (its first task's start to its last task's end, from the tests' results callback) and its summary's
seconds; every backup's image is compared with its disk. ssh's control masters of the run before are closed before
each run, so that every run opens its connections as a scheduled run would.
"""

import os
import pathlib
import statistics
import subprocess
import sys
import time

from support.fleet_tls import hypervisors_with_vm_dirs, pull_over_tls
from support.qemu_vm import DiskSpec, MiB, Vm, same
from support.ssh_fleet import SshFleet

from bench import (  # noqa: E402  (bench.py put the paths in place)
    ROOT, build_disk, module_runs, role_copies, role_summary, wait_for_quiet)

sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from test_fleet import line_of, manifest, run_fleet  # noqa: E402  (the fleet test's own runner, forks=8)

MODES = {
    "local": "on each hypervisor (copy over the unix socket)",
    "tls": "on the backup host (copy pulled over NBD+TLS)",
}
HYPERVISORS = 2
VMS_PER_HYPERVISOR = 4
CONTROL_PERSIST = "-C -o ControlMaster=auto -o ControlPersist=60s"  # Ansible's default ssh_args
# The settings the fleet runs with (the README's ansible.cfg), and each one changed alone.
RECOMMENDED = dict(pipelining=True, ssh_args=CONTROL_PERSIST, forks=8)
SETTINGS = {
    "pipelining on, ControlPersist on, forks 8 (recommended)": RECOMMENDED,
    "pipelining off (Ansible's default)": dict(RECOMMENDED, pipelining=False),
    "ControlPersist off (ssh_args -C)": dict(RECOMMENDED, ssh_args="-C"),
    "forks 4": dict(RECOMMENDED, forks=4),
    "forks 1": dict(RECOMMENDED, forks=1),
}
WARM_UP = """- name: Prepare the hypervisors (their Python environments), untimed
  hosts: hypervisors
  gather_facts: false
  roles:
    - role: fleetbackup.qemu.qemu_hypervisor
"""


# The fleet playbook's last play, after the report: the hosts' spans end before it.
LAST_PLAY_TASK = "Fail the host with its error"


def before_last_play(span):
    """The span of a host's tasks without the last play's."""
    tasks = [task for task in span["tasks"] if task[0].split(" : ")[-1] != LAST_PLAY_TASK]
    return dict(span, tasks=tasks, last=max(began + seconds for _name, seconds, _skipped, began in tasks),
                ran=sum(1 for task in tasks if not task[2]), skipped=sum(1 for task in tasks if task[2]))


def span_of(spans, hosts):
    return max(spans[host]["last"] for host in hosts) - min(spans[host]["first"] for host in hosts)


class FleetBench:
    """The SSH fleet, each mode's VMs on it, and the variables that put each mode's repositories in place."""

    def __init__(self, workdir, size, data):
        self.workdir = pathlib.Path(workdir).resolve()  # sshd re-executes itself from /: absolute paths only
        self.size = size
        self.fleet = SshFleet(self.workdir, hypervisors=HYPERVISORS).start()
        self.vms = {}  # mode: {repository name: Vm}
        self.settings = {}  # mode: (all_vars, vm_vars)
        self.dirtied = 0
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

    def use(self, mode, settings):
        all_vars, vm_vars = self.settings[mode]
        self.fleet.all_vars.clear()
        self.fleet.all_vars.update(all_vars, ansible_pipelining=settings["pipelining"],
                                   ansible_ssh_args=settings["ssh_args"])
        self.fleet.vm_vars.clear()
        self.fleet.vm_vars.update(vm_vars)
        for hypervisor in self.fleet.hypervisors:
            self.fleet.hostvars[hypervisor]["fleetbackup_qmp_sockets"] = [
                str(self.fleet.vm_dirs[hypervisor] / (mode + "*") / "qmp.sock")]

    def repository(self, mode, name):
        if mode == "tls":
            return str(self.workdir / "backup" / "repository")
        return str(self.workdir / name.split("@")[1] / "repository")

    def dirty_one_percent(self, mode):
        """1% of each disk in 1 MiB writes spread over it, written as the guest would, through QMP."""
        self.dirtied += 1
        writes = self.size // 100 // MiB
        for vm in self.vms[mode].values():
            for index in range(writes):
                vm.write("vda", (index * (self.size // writes)) // MiB * MiB, MiB, 0xB0 + self.dirtied % 64)

    def close_masters(self):
        """End the ssh control masters the run before left (ours, in the fleet's own directory), as ssh -O exit
        asks them to."""
        for socket in os.listdir(self.fleet.control_path_dir):
            subprocess.run(["ssh", "-o", "ControlPath=%s" % (self.fleet.control_path_dir / socket), "-O", "exit",
                            "fleet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def run(self, mode, level, settings=None):
        """One timed run of the fleet playbook, checked: {wall, play, hypervisors, vms: {name: {...}}, load};
        settings: one of SETTINGS, default the recommended."""
        settings = settings or RECOMMENDED
        self.use(mode, settings)
        self.close_masters()
        os.sync()
        load = os.getloadavg()[0]
        began = time.monotonic()
        rc, results, output, summary = run_fleet(self.fleet, "-e", "qemu_backup_level=%s" % level,
                                                 "-f", str(settings["forks"]))
        wall = time.monotonic() - began
        if rc != 0 or results["failures"]:
            raise SystemExit("the %s %s run failed: %s\n%s" % (mode, level, results["failures"], output[-4000:]))
        spans = {host: before_last_play(span) if host != "localhost" else span
                 for host, span in results["spans"].items()}
        others = {name for other in MODES if other != mode for name in self.vms[other]}
        if any(name not in spans for name in self.vms[mode]) or others & set(results["stats"]):
            raise SystemExit("the %s run did not back up exactly its own VMs: %s" % (mode, sorted(results["stats"])))
        vms = {}
        for name, vm in self.vms[mode].items():
            tasks = results["tasks"][name]
            # Read loosely: the summary line's wording may change, the fact's keys stay.
            run_summary = role_summary(tasks)
            line = line_of(summary, name)
            if run_summary["result"] != "ok" or run_summary["level"] != level or level not in line:
                raise SystemExit("%s: not a %s backup: %s; %s" % (name, level, run_summary, line))
            self.check(mode, name, vm, level)
            copies = role_copies(tasks)
            span = spans[name]
            vms[name] = dict(role=span["last"] - span["first"], summary=run_summary["seconds"], tasks=span["ran"],
                             skipped=span["skipped"], modules=sum(module_runs(result) for result in tasks.values()),
                             copy=max(copy["elapsed"] for copy in copies),
                             bytes=sum(copy["bytes_read"] for copy in copies),
                             own=sum(seconds for _name, seconds, _skipped, _began in span["tasks"]))
        return dict(wall=wall, play=span_of(spans, self.vms[mode]), hypervisors=span_of(spans, self.fleet.hypervisors),
                    sum_up=span_of(spans, ["localhost"]), vms=vms, load=load,
                    hypervisor_tasks={name.split(" : ")[-1]: seconds
                                      for name, seconds, _skipped, _began in spans[self.fleet.hypervisors[0]]["tasks"]})

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
        self.close_masters()
        for machines in self.vms.values():
            for vm in machines.values():
                vm.kill()
        self.fleet.stop()


def bench_fleet(workdir, size, data, rounds, settings_rounds, quiet_load):
    """({mode: {level: [run]}}, {setting: [run]}), each run as FleetBench.run returns it."""
    bench = FleetBench(workdir, size, data)
    results = {mode: {"full": [], "incremental": []} for mode in MODES}
    by_setting = {label: [] for label in SETTINGS}
    try:
        for round_index in range(rounds):
            wait_for_quiet(quiet_load)
            for mode in list(MODES) if round_index % 2 == 0 else list(reversed(MODES)):
                results[mode]["full"].append(bench.run(mode, "full"))
                bench.dirty_one_percent(mode)
                results[mode]["incremental"].append(bench.run(mode, "incremental"))
        for round_index in range(settings_rounds):
            wait_for_quiet(quiet_load)
            for label in list(SETTINGS) if round_index % 2 == 0 else list(reversed(SETTINGS)):
                bench.dirty_one_percent("local")
                by_setting[label].append(bench.run("local", "incremental", SETTINGS[label]))
    finally:
        bench.stop()
    return results, by_setting


def median(runs, key):
    return statistics.median(run[key] for run in runs)


def report_fleet(results, size, data, rounds, settings_rounds):
    modes, by_setting = results
    print()
    print("Fleet run: %d hypervisors x %d QMP VMs, each one %d MiB disk with %d MiB of data; backup_hypervisors.yml"
          " over SSH, pipelining on, ControlPersist on, -f 8; %d rounds; medians over the rounds (and over the VMs"
          " for the per-VM columns):" % (HYPERVISORS, VMS_PER_HYPERVISOR, size // MiB, data // MiB, rounds))
    print("| repository | run | whole run s | hypervisors' play s | backup play s | per VM: role run s "
          "| per VM: its tasks s | per VM: module tasks | per VM: summary s | per VM: copy s | MiB read per VM |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    every_vm = [vm for levels in modes.values() for runs in levels.values() for run in runs
                for vm in run["vms"].values()]
    for mode, levels in modes.items():
        for level, runs in levels.items():
            per_vm = [vm for run in runs for vm in run["vms"].values()]
            print("| %s | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %s | %.2f | %.2f | %.1f |" % (
                MODES[mode], level, median(runs, "wall"), median(runs, "hypervisors"), median(runs, "play"),
                median(per_vm, "role"), median(per_vm, "own"), "/".join(sorted({str(vm["modules"]) for vm in per_vm})),
                median(per_vm, "summary"), median(per_vm, "copy"), median(per_vm, "bytes") / MiB))
    loads = [run["load"] for levels in modes.values() for runs in levels.values() for run in runs]
    print("Load average (1 min) at the runs' starts: %.2f to %.2f." % (min(loads), max(loads)))
    tasks = sorted({(vm["tasks"], vm["skipped"]) for vm in every_vm})
    print("Tasks per VM: %s." % " or ".join("%d ran and %d skipped" % pair for pair in tasks))
    report_parts(modes["local"]["incremental"])
    if not settings_rounds:
        return
    print()
    print("Ansible's settings, on the local repositories' 1%% incremental of the %d VMs; %d rounds, medians:"
          % (HYPERVISORS * VMS_PER_HYPERVISOR, settings_rounds))
    print("| settings | whole run s | hypervisors' play s | backup play s | per VM: role run s | vs recommended s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    recommended = median(by_setting[next(iter(SETTINGS))], "wall")
    for label, runs in by_setting.items():
        per_vm = [vm for run in runs for vm in run["vms"].values()]
        print("| %s | %.1f | %.1f | %.1f | %.1f | %+.1f |" % (
            label, median(runs, "wall"), median(runs, "hypervisors"), median(runs, "play"), median(per_vm, "role"),
            median(runs, "wall") - recommended))
    loads = [run["load"] for runs in by_setting.values() for run in runs]
    print("Load average (1 min) at the runs' starts: %.2f to %.2f." % (min(loads), max(loads)))


def report_parts(runs):
    """Where the local repositories' incremental run goes: its plays, and the hypervisor play's tasks on hv1."""
    print()
    print("Where the whole incremental run goes (local repositories; medians, s):")
    print("| part | s |")
    print("| --- | ---: |")
    parts = [("the whole run", median(runs, "wall")),
             ("- the hypervisors' play (each hypervisor's tasks, side by side)", median(runs, "hypervisors"))]
    parts += [("  - %s (on hv1)" % name, statistics.median(run["hypervisor_tasks"][name] for run in runs))
              for name in runs[0]["hypervisor_tasks"]]
    parts += [("- the backup play (the VMs side by side)", median(runs, "play")),
              ("- the last play: a line per VM, and the run's report", median(runs, "sum_up")),
              ("- ansible-playbook's start, end and the plays' changes (the rest)",
               statistics.median(run["wall"] - run["hypervisors"] - run["play"] - run["sum_up"] for run in runs))]
    for label, seconds in parts:
        print("| %s | %.2f |" % (label, seconds))
