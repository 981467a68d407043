"""make bench, libvirt part: the backup role, the qemu_backup module alone and virtnbdbackup on one libvirt domain.

One domain of a private libvirtd (as the tests start it), one disk with data in many extents. In each round each
tool in turn, in alternating order, takes a full backup, 1% of the disk is dirtied, it takes an incremental, and its
chain is restored and compared with the disk (a restore that differs ends the bench). The role runs through
ansible-playbook, as users run it; the module alone is qemu_backup's own process, started directly with its
arguments in a file, as a script would run it (Ansible on the host runs the same process, packed); virtnbdbackup is
Debian's. Wall time and peak RSS (the largest process of the run) of every step. After the rounds, in turns: the
role and the module when no backup is due, and what bounds the role's time: ansible-playbook with one module task,
Python's start and the module's imports.
"""

import json
import os
import statistics
import subprocess
import sys
import time
import zipfile

from support.libvirt_daemon import LibvirtDaemon, LibvirtDomain
from support.modules import ansible_bin, results_env
from support.paths import COLLECTIONS
from support.qemu_vm import DiskSpec, MiB, same

from bench import (  # noqa: E402  (bench.py put the paths in place)
    build_disk, module_runs, role_copies, role_summary, timed_with_rss, wait_for_quiet)

PLAYBOOKS = os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "playbooks")
MODULES = "ansible_collections.fleetbackup.qemu.plugins.modules."
VM = "bench"
ONE_MODULE_TASK = """- name: One module task, the floor of any playbook run
  hosts: vms
  gather_facts: false
  tasks:
    - name: Ping
      ansible.builtin.ping:
"""
LEVELS = ("full", "incremental")


def step(seconds, rss, inner=None, copy=None, **playbook):
    """One timed run: wall seconds, peak RSS MiB; for ours the module's own run (its summary's seconds) and the
    copy's; for a playbook its parts (Role.play)."""
    return dict(seconds=seconds, rss=rss, inner=inner, copy=copy, **playbook)


def slowest_copy(copies):
    return max((copy["elapsed"] for copy in copies), default=0.0)


class Role:
    """The backup role through ansible-playbook, timed task by task with the tests' results callback."""

    label = "the qemu_backup role (ansible-playbook)"

    def __init__(self, workdir, domain):
        self.workdir = workdir
        self.runs = 0
        self.inventory = os.path.join(workdir, "inventory.json")
        with open(self.inventory, "w") as stream:
            vm = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                  "qemu_backup_domain": domain.name, "qemu_backup_libvirt_uri": domain.daemon.uri,
                  "qemu_backup_qemu_dir": domain.qemu_dir, "qemu_backup_repository": os.path.join(workdir, "repository"),
                  "qemu_backup_state_dir": os.path.join(workdir, "state")}
            json.dump({"vms": {"hosts": {VM: vm}},
                       "all": {"vars": {"fleetbackup_report_dir": os.path.join(workdir, "reports")}}}, stream)
        os.makedirs(os.path.join(workdir, "repository"))

    def play(self, playbook, **extra_vars):
        """step() of one ansible-playbook run, with the role's summary and copies when it backed up."""
        self.runs += 1
        results_file = os.path.join(self.workdir, "results-%d.json" % self.runs)
        seconds, rss, _output = timed_with_rss([ansible_bin("ansible-playbook"), playbook, "-i", self.inventory,
                                                "-e", json.dumps(extra_vars)], env=results_env(results_file))
        with open(results_file) as stream:
            results = json.load(stream)
        tasks, span = results["tasks"][VM], results["spans"][VM]
        summary = role_summary(tasks) or {}
        modules = {name for name, result in tasks.items() if module_runs(result)}
        ran = [name for name, _seconds, skipped, _began in span["tasks"] if not skipped]
        sum_up = results["spans"].get("localhost")
        return step(seconds, rss, summary.get("seconds"), slowest_copy(role_copies(tasks)), tasks=ran,
                    vm_play=span["last"] - span["first"], sum_up=sum_up and sum_up["last"] - sum_up["first"],
                    module_tasks=sum(seconds for name, seconds, skipped, _began in span["tasks"]
                                     if not skipped and name.split(" : ")[-1] in modules))

    def backup(self, level):
        return self.play(os.path.join(PLAYBOOKS, "fleet_backup.yml"), qemu_backup_level=level)

    def nothing_due(self):
        return self.play(os.path.join(PLAYBOOKS, "fleet_backup.yml"), qemu_backup_max_age="1d")

    def one_module_task(self):
        playbook = os.path.join(self.workdir, "ping.yml")
        with open(playbook, "w") as stream:
            stream.write(ONE_MODULE_TASK)
        return self.play(playbook)

    def restore(self, dest):
        seconds, rss, _output = timed_with_rss([ansible_bin("ansible-playbook"), os.path.join(PLAYBOOKS, "restore.yml"),
                                                "-i", self.inventory, "-e", json.dumps({"qemu_restore_dest": dest})],
                                               env=results_env(os.path.join(self.workdir, "restore.json")))
        return step(seconds, rss), os.path.join(dest, "vda.qcow2")


class Module:
    """qemu_backup's process, started directly with its arguments in a file: the role's one module run, alone."""

    label = "the qemu_backup module alone (its process, run directly)"

    def __init__(self, workdir, domain):
        self.workdir = workdir
        self.repository = os.path.join(workdir, "repository")
        os.makedirs(self.repository)
        self.vm_args = dict(domain=domain.name, libvirt_uri=domain.daemon.uri, qemu_dir=domain.qemu_dir,
                            state_dir=os.path.join(workdir, "state"))

    def run(self, module, **args):
        """(seconds, peak RSS MiB, result) of one module process."""
        args_file = os.path.join(self.workdir, "args.json")
        with open(args_file, "w") as stream:
            json.dump({"ANSIBLE_MODULE_ARGS": args}, stream)
        seconds, rss, output = timed_with_rss([sys.executable, "-m", MODULES + module, args_file],
                                              env=dict(os.environ, PYTHONPATH=COLLECTIONS))
        return seconds, rss, json.loads(output)

    def _backup(self, **args):
        seconds, rss, result = self.run("qemu_backup", repository=self.repository, vm=VM, **self.vm_args, **args)
        return step(seconds, rss, result["summary"]["seconds"], slowest_copy(result.get("copies") or []))

    def backup(self, level):
        return self._backup(level=level)

    def nothing_due(self):
        return self._backup(max_age="1d")

    def restore(self, dest):
        seconds, rss, _result = self.run("qemu_backup_restore", repository=self.repository, vm=VM, dest=dest)
        return step(seconds, rss), os.path.join(dest, "vda.qcow2")


class Virtnbdbackup:
    """virtnbdbackup and virtnbdrestore from Debian, one output directory per chain."""

    label = "virtnbdbackup %s" % subprocess.run(["dpkg-query", "-W", "-f=${Version}", "virtnbdbackup"],
                                                stdout=subprocess.PIPE, text=True, check=False).stdout
    LEVELS = {"full": "full", "incremental": "inc"}

    def __init__(self, workdir, domain):
        self.workdir = workdir
        self.domain = domain
        self.chains = 0
        self.scratch = os.path.join(workdir, "scratch")
        os.makedirs(self.scratch)

    def _output(self):
        return os.path.join(self.workdir, "chain-%d" % self.chains)

    def backup(self, level):
        self.chains += level == "full"
        seconds, rss, _output = timed_with_rss(["virtnbdbackup", "-U", self.domain.daemon.uri, "-d", self.domain.name,
                                                "-l", self.LEVELS[level], "-o", self._output(), "-S", self.scratch,
                                                "-n"])
        return step(seconds, rss)

    def restore(self, dest):
        """virtnbdrestore writes through a qemu-nbd of its own that closes the image after virtnbdrestore ended: the
        restore is done once that qemu-nbd is gone."""
        socket = os.path.join(self.workdir, "restore.sock")
        began = time.monotonic()
        _seconds, rss, _output = timed_with_rss([
            "virtnbdrestore", "-U", self.domain.daemon.uri, "-i", self._output(), "-o", dest, "-n", "-f", socket,
            "-L", os.path.join(self.workdir, "restore-%d.log" % self.chains)])
        while serving(socket):
            if time.monotonic() - began > 300:
                raise SystemExit("virtnbdrestore's qemu-nbd on %s did not end" % socket)
            time.sleep(0.01)
        return step(time.monotonic() - began, rss), os.path.join(dest, os.path.basename(self.domain.image("vda")))


def serving(socket):
    """Whether a process named socket on its command line (virtnbdrestore's qemu-nbd) still runs."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as stream:
                if socket.encode() in stream.read().split(b"\0"):
                    return True
        except OSError:
            continue  # ended meanwhile
    return False


def dirty_one_percent(domain, size, pattern):
    writes = size // 100 // MiB
    for index in range(writes):
        domain.write("vda", (index * (size // writes)) // MiB * MiB, MiB, pattern)


def python_start(workdir, rounds):
    """Median seconds of a bare Python, of one that imports the qemu_backup module (and what it imports) from their
    bytecode, and of one that imports the collection's code from a zip of its sources, as under Ansible: AnsiballZ
    ships them in a zip, which Python compiles on every import and never caches (the rest keeps its bytecode)."""
    sources = os.path.join(workdir, "collection-sources.zip")
    with zipfile.ZipFile(sources, "w") as archive:
        archive.writestr("ansible_collections/__init__.py", "")
        for directory, _dirs, files in os.walk(os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup")):
            package = os.path.relpath(directory, COLLECTIONS)
            if "__init__.py" not in files:  # zipimport wants packages, as AnsiballZ makes them
                archive.writestr(os.path.join(package, "__init__.py"), "")
            for name in files:
                if name.endswith(".py"):
                    archive.write(os.path.join(directory, name), os.path.join(package, name))
    imports = [sys.executable, "-c", "import " + MODULES + "qemu_backup"]
    bare, cached, compiled = [], [], []
    for _round in range(rounds):
        bare.append(timed_with_rss([sys.executable, "-c", "pass"], env=dict(os.environ, PYTHONPATH=COLLECTIONS))[0])
        cached.append(timed_with_rss(imports, env=dict(os.environ, PYTHONPATH=COLLECTIONS))[0])
        compiled.append(timed_with_rss(imports, env=dict(os.environ, PYTHONPATH=sources))[0])
    return statistics.median(bare), statistics.median(cached), statistics.median(compiled)


def bench_libvirt(workdir, size, data, rounds, quiet_load):
    """{"steps": {tool: {step: [step()]}}, "python": (bare, with the module's imports)} of the rounds."""
    daemon = LibvirtDaemon(os.path.join(workdir, "libvirt"), os.path.join(workdir, "libvirt-cache")).start()
    steps = {}
    try:
        path = os.path.join(workdir, "domain")
        os.makedirs(path)
        domain = LibvirtDomain(path, [DiskSpec("vda", size=size)], daemon, "fb-bench-%d" % os.getpid())
        build_disk(domain, "vda", size, data)  # offline, before the start: no monitor needed
        domain.start()
        tools = []
        for tool_class in (Role, Module, Virtnbdbackup):
            tool_dir = os.path.join(workdir, tool_class.__name__.lower())
            os.makedirs(tool_dir)
            tools.append(tool_class(tool_dir, domain))
            steps[tool_class.label] = {"full": [], "incremental": [], "nothing due": [], "restore": []}
        for round_index in range(rounds):
            wait_for_quiet(quiet_load)
            for turn, tool in enumerate(tools if round_index % 2 == 0 else tools[::-1]):
                # virtnbdbackup refuses to run beside checkpoints it did not create: each tool gets the domain alone.
                for checkpoint in domain.domain.listAllCheckpoints(0):
                    checkpoint.delete(0)
                runs = steps[tool.label]
                runs["full"].append(tool.backup("full"))
                dirty_one_percent(domain, size, 0xA0 + 2 * round_index + turn)
                runs["incremental"].append(tool.backup("incremental"))
                expected = domain.expected_image("vda", domain.mark("vda"), os.path.join(workdir, "expected.raw"))
                dest = os.path.join(tool.workdir, "restored-%d" % round_index)
                os.makedirs(dest)
                restored, image = tool.restore(dest)
                if not same(image, expected):
                    raise SystemExit("%s's restore of round %d differs from the disk" % (tool.label, round_index))
                runs["restore"].append(restored)
                os.unlink(image)
                os.unlink(expected)
        role = tools[0]
        floor = []
        for round_index in range(rounds):
            wait_for_quiet(quiet_load)
            for tool in tools[:2] if round_index % 2 == 0 else tools[1::-1]:
                steps[tool.label]["nothing due"].append(tool.nothing_due())
            floor.append(role.one_module_task())
        steps["ansible-playbook, one module task (ping)"] = {"nothing due": floor}
    finally:
        daemon.stop()
    return dict(steps=steps, python=python_start(workdir, max(rounds, 5)))


def median(runs, key="seconds"):
    values = [run[key] for run in runs if run[key] is not None]
    return statistics.median(values) if values else None


def shown(value, form="%.2f"):
    return "" if value is None else form % value


def report_libvirt(results, size, data, rounds):
    steps = results["steps"]
    print()
    print("libvirt domain, %d MiB disk with %d MiB of data; %d rounds, medians (max peak RSS); load average %.2f:"
          % (size // MiB, data // MiB, rounds, os.getloadavg()[0]))
    print("| tool | full backup s | incremental 1% s | nothing due s | restore of the chain s "
          "| peak RSS MiB (full / inc / restore) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    columns = ("full", "incremental", "nothing due", "restore")
    for tool, runs in steps.items():
        peaks = [max((run["rss"] for run in runs[name] if run["rss"]), default=None)
                 for name in ("full", "incremental", "restore") if name in runs]
        times = " | ".join(shown(median(runs[name])) if name in runs else "" for name in columns)
        print("| %s | %s | %s |" % (tool, times, " / ".join("%.0f" % peak for peak in peaks if peak)))
    role, module, virtnbd = (steps[label] for label in (Role.label, Module.label, Virtnbdbackup.label))
    print()
    print("| target | measured | target | |")
    print("| --- | ---: | ---: | --- |")
    for label, measured, target in (
            ("role incremental / virtnbdbackup's", median(role["incremental"]) / median(virtnbd["incremental"]), 1.0),
            ("role full / virtnbdbackup's", median(role["full"]) / median(virtnbd["full"]), 0.8),
            ("role, nothing due, s", median(role["nothing due"]), 1.5)):
        print("| %s | %.2f | <= %.1f | %s |" % (label, measured, target, "met" if measured <= target else "missed"))
    bare, imports, compiled = results["python"]
    ping = steps["ansible-playbook, one module task (ping)"]["nothing due"]
    print()
    print("What the role's runs are made of (medians, s):")
    print("| part | full | incremental 1% | nothing due |")
    print("| --- | ---: | ---: | ---: |")
    kinds = ("full", "incremental", "nothing due")
    for label, values in (
            ("the role through ansible-playbook", [median(role[kind]) for kind in kinds]),
            ("- the VM's play: its tasks, first start to last end", [median(role[kind], "vm_play") for kind in kinds]),
            ("  - of which the module task", [median(role[kind], "module_tasks") for kind in kinds]),
            ("    - of which the module's run (its summary's seconds)",
             [median(role[kind], "inner") for kind in kinds]),
            ("- the last play: a line per VM, and the run's report", [median(role[kind], "sum_up") for kind in kinds]),
            ("- ansible-playbook's own start and end (the rest)",
             [median([dict(seconds=run["seconds"] - run["vm_play"] - (run["sum_up"] or 0)) for run in role[kind]])
              for kind in kinds]),
            ("ansible-playbook with one module task (ping)", [median(ping)] * 3),
            ("- of which the task", [median(ping, "module_tasks")] * 3),
            ("the module alone, its whole process", [median(module[kind]) for kind in kinds]),
            ("- of which its run (its summary's seconds)", [median(module[kind], "inner") for kind in kinds]),
            ("  - of which the copy (the engine's elapsed)",
             [median(module[kind], "copy") for kind in LEVELS] + [None]),
            ("- Python's start with the module's imports", [imports] * 3),
            ("  - of which a bare Python's start", [bare] * 3),
            ("- the same, the collection's code compiled from a zip of sources (as under Ansible)", [compiled] * 3)):
        print("| %s | %s |" % (label, " | ".join(shown(value) for value in values)))
    tasks = role["incremental"][-1]["tasks"]
    print("The role's incremental ran %d tasks for the VM: %s." % (len(tasks), "; ".join(
        name.split(" : ")[-1] for name in tasks)))
    print("The module alone restores with the qemu_backup_restore module's process; the role with restore.yml.")
