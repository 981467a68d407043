"""make bench, libvirt part: the backup and restore roles on a libvirt domain, beside virtnbdbackup.

One domain of a private libvirtd (as the tests start it), one disk with data in many extents. In each round each
tool in turn, in alternating order, takes a full backup (the role through ansible-playbook, as users run it),
1% of the disk is dirtied, it takes an incremental, and its chain is restored and compared with the disk. Wall time
and peak RSS (the largest process of the run) of every step. The modules alone (start, copy, stop, as a script
would run them) show what the roles' Ansible tasks add.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from support.libvirt_daemon import LibvirtDaemon, LibvirtDomain
from support.flows import Backups
from support.modules import ansible_bin, ansible_env
from support.qemu_vm import DiskSpec, MiB, same

from bench import build_disk, timed_with_rss  # noqa: E402  (bench.py put the paths in place)

PLAYBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "collections",
                         "ansible_collections", "fleetbackup", "qemu", "playbooks")


class Fleetbackup:
    """The roles, through ansible-playbook, on one libvirt domain."""

    label = "fleetbackup.qemu (roles)"

    def __init__(self, workdir, domain):
        self.workdir = workdir
        self.repository = os.path.join(workdir, "repository")
        os.makedirs(self.repository)
        self.inventory = os.path.join(workdir, "inventory.json")
        with open(self.inventory, "w") as stream:
            json.dump({"vms": {"hosts": {"bench": {
                "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                "qemu_backup_domain": domain.name, "qemu_backup_libvirt_uri": domain.daemon.uri,
                "qemu_backup_qemu_dir": domain.qemu_dir, "qemu_backup_repository": self.repository,
                "qemu_backup_state_dir": os.path.join(workdir, "state")}}}}, stream)

    def _play(self, playbook, **extra_vars):
        return timed_with_rss([ansible_bin("ansible-playbook"), os.path.join(PLAYBOOKS, playbook), "-i",
                               self.inventory, "-e", json.dumps(extra_vars)], env=ansible_env())

    def full(self, round_index):
        return self._play("fleet_backup.yml", qemu_backup_level="full")

    def incremental(self, round_index):
        return self._play("fleet_backup.yml", qemu_backup_level="incremental")

    def nothing_due(self):
        """The role's fixed cost: ansible-playbook, the lease, info and plan, with no backup due."""
        return self._play("fleet_backup.yml", qemu_backup_max_age="1d")

    def restore(self, round_index, dest):
        elapsed, rss = self._play("restore.yml", qemu_restore_dest=dest)
        return elapsed, rss, os.path.join(dest, "vda.qcow2")


class FleetbackupModules:
    """The start, copy and stop modules, one process each, without Ansible: the engine under the roles."""

    label = "fleetbackup.qemu (modules alone)"

    def __init__(self, workdir, domain):
        self.workdir = workdir
        self.backups = Backups(domain, workdir)
        self.chain = None  # (image prefix, checkpoint) of the newest backup

    def _backup(self, name, previous=None):
        os.sync()
        started = time.monotonic()
        backup_id = "%s-%d" % (name, time.monotonic_ns())
        result = self.backups.start(backup_id, checkpoint=backup_id, incremental=previous and previous[1])
        assert not result.failed, result
        self.backups.copy_all(result["backup"], self.workdir, backup_id, previous and previous[0])
        stopped = self.backups.stop(backup_id)
        assert not stopped.failed and stopped["intact"], stopped
        elapsed = time.monotonic() - started
        self.chain = (backup_id, backup_id)
        return elapsed, None

    def full(self, round_index):
        return self._backup("full")

    def incremental(self, round_index):
        return self._backup("inc", self.chain)

    def restore(self, round_index, dest):
        image = os.path.join(dest, "vda.qcow2")
        started = time.monotonic()
        top = os.path.join(self.workdir, "%s.vda.qcow2" % self.chain[0])
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", top, image], check=True)
        return time.monotonic() - started, None, image


class Virtnbdbackup:
    """virtnbdbackup and virtnbdrestore from Debian, one output directory per chain."""

    label = "virtnbdbackup %s" % subprocess.run(["dpkg-query", "-W", "-f=${Version}", "virtnbdbackup"],
                                                stdout=subprocess.PIPE, text=True, check=False).stdout

    def __init__(self, workdir, domain):
        self.workdir = workdir
        self.domain = domain
        self.scratch = os.path.join(workdir, "scratch")
        os.makedirs(self.scratch)

    def _output(self, round_index):
        return os.path.join(self.workdir, "chain-%d" % round_index)

    def _backup(self, round_index, level):
        return timed_with_rss(["virtnbdbackup", "-U", self.domain.daemon.uri, "-d", self.domain.name, "-l", level,
                               "-o", self._output(round_index), "-S", self.scratch, "-n"])

    def full(self, round_index):
        return self._backup(round_index, "full")

    def incremental(self, round_index):
        return self._backup(round_index, "inc")

    def restore(self, round_index, dest):
        elapsed, rss = timed_with_rss(["virtnbdrestore", "-U", self.domain.daemon.uri, "-i",
                                       self._output(round_index), "-o", dest, "-n",
                                       "-L", os.path.join(self.workdir, "restore-%d.log" % round_index)])
        return elapsed, rss, os.path.join(dest, os.path.basename(self.domain.image("vda")))  # the source's name


def dirty_one_percent(domain, size, pattern):
    writes = size // 100 // MiB
    for index in range(writes):
        domain.write("vda", (index * (size // writes)) // MiB * MiB, MiB, pattern)


def bench_libvirt(workdir, size, data, rounds):
    """{tool: {step: [(seconds, peak RSS MiB)]}} for rounds of full, 1% incremental and restore."""
    daemon = LibvirtDaemon(os.path.join(workdir, "libvirt"), os.path.join(workdir, "libvirt-cache")).start()
    results = {}
    try:
        path = os.path.join(workdir, "domain")
        os.makedirs(path)
        domain = LibvirtDomain(path, [DiskSpec("vda", size=size)], daemon, "fb-bench-%d" % os.getpid())
        build_disk(domain, "vda", size, data)  # offline, before the start: no monitor needed
        domain.start()
        tools = []
        for tool_class in (Fleetbackup, FleetbackupModules, Virtnbdbackup):
            tool_dir = os.path.join(workdir, tool_class.__name__.lower())
            os.makedirs(tool_dir)
            tools.append(tool_class(tool_dir, domain))
            results[tool_class.label] = {"full": [], "incremental, 1% dirty": [], "restore": []}
        for round_index in range(rounds):
            for turn, tool in enumerate(tools if round_index % 2 == 0 else tools[::-1]):
                # virtnbdbackup refuses to run beside checkpoints it did not create: each tool gets the domain alone.
                for checkpoint in domain.domain.listAllCheckpoints(0):
                    checkpoint.delete(0)
                steps = results[tool.label]
                steps["full"].append(tool.full(round_index))
                dirty_one_percent(domain, size, 0xA0 + 2 * round_index + turn)
                steps["incremental, 1% dirty"].append(tool.incremental(round_index))
                expected = domain.expected_image("vda", domain.mark("vda"), os.path.join(workdir, "expected.raw"))
                dest = os.path.join(tool.workdir, "restored-%d" % round_index)
                os.makedirs(dest)
                elapsed, rss, image = tool.restore(round_index, dest)
                if not same(image, expected):
                    raise SystemExit("%s's restore of round %d differs from the disk" % (tool.label, round_index))
                steps["restore"].append((elapsed, rss))
                os.unlink(image)
                os.unlink(expected)
        results["fixed cost"] = [tools[0].nothing_due() for _round in range(rounds)]
    finally:
        daemon.stop()
    return results


def report_libvirt(results, size, data, rounds):
    print()
    print("libvirt domain, %d GiB disk with %d GiB of data; %d rounds, median (max peak RSS):"
          % (size // 1024 // MiB, data // 1024 // MiB, rounds))
    print("| tool | full backup s | incremental 1% s | restore of the chain s | peak RSS MiB (full / inc / restore) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    fixed = results.pop("fixed cost")
    for tool, steps in results.items():
        times = [statistics.median(seconds for seconds, _rss in runs) for runs in steps.values()]
        peaks = [max((rss for _seconds, rss in runs if rss), default=None) for runs in steps.values()]
        shown = " / ".join("%.0f" % peak if peak else "-" for peak in peaks)
        print("| %s | %.2f | %.2f | %.2f | %s |" % (tool, *times, shown))
    print("The modules alone restore with qemu-img convert of the chain's top (the restore module reads a repository).")
    print("The role's fixed cost (ansible-playbook, lease, info and plan; no backup due): %.2f s, in every run above."
          % statistics.median(seconds for seconds, _rss in fixed))
