"""make bench: our copy engine against nbdcopy and qemu-img convert, on the same live backup export.

It builds an 8 GiB disk holding 2 GiB of data in many extents, with zeroed and
unallocated regions, starts a backup of it in a real QEMU, and times every
copier in turn, alternating, several rounds. Then it times an incremental with
1% of the disk dirty, the same copy over the unix socket, plain TCP and TCP with
TLS, checks peak memory on a 64 GiB disk and the mapping of a 1 TiB sparse one,
backs up a libvirt domain beside virtnbdbackup, and times the fleet playbook per VM
(fleet_bench.py). Every output is checked with qemu-img compare.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "build", "collections"))

from support.certificates import HYPERVISOR_ADDRESS, FleetCertificates  # noqa: E402  (needs the paths above)
from support.modules import run_module  # noqa: E402
from support.qemu_vm import DiskSpec, MiB, Vm, same  # noqa: E402

GiB = 1024 * MiB
MODULE = "ansible_collections.fleetbackup.qemu.plugins.modules.qemu_backup_copy"


def build_disk(vm, disk, size, data):
    """data bytes in 32 extents spread over the disk, plus zeroed regions between them."""
    extents = 32
    chunk = data // extents
    stride = size // extents
    for index in range(extents):
        vm.write(disk, index * stride, chunk, 0x10 + index)
        if index % 4 == 1:
            vm.zero(disk, index * stride + chunk, min(64 * MiB, stride - chunk))


def make_vm(workdir, name, size):
    path = os.path.join(workdir, name)
    os.makedirs(path, exist_ok=True)
    return Vm(path, [DiskSpec("vda", size=size)])


def timed(argv, stdin=None, env=None):
    """Run argv, after writing back what earlier runs left in the page cache; return (seconds, stdout)."""
    os.sync()
    started = time.monotonic()
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    stdout, stderr = process.communicate(stdin)
    elapsed = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError("%s failed: %s %s" % (argv[0], stdout[-2000:], stderr[-2000:]))
    return elapsed, stdout


def peak_rss_mib(argv, stdin=None, env=None):
    """Peak RSS in MiB of a command or the largest child it waited for, from wait4's rusage."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)
    process.stdin.write(stdin or b"")
    process.stdin.close()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError("%s failed with %d" % (argv[0], process.returncode))
    return usage.ru_maxrss / 1024


def wait_for_quiet(below, poll=20, limit=900):
    """Wait until the 1-minute load average is below `below` (0: no wait), at most limit seconds; say how it went."""
    began = time.monotonic()
    while below and os.getloadavg()[0] >= below and time.monotonic() - began < limit:
        time.sleep(poll)
    waited = time.monotonic() - began
    print("load average %.2f after %.0f s of waiting for < %.1f" % (os.getloadavg()[0], waited, below), flush=True)


def timed_with_rss(argv, env=None):
    """(seconds, peak RSS in MiB of the command or the largest process it waited for, its stdout) of a run that
    must succeed."""
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as errors:
        os.sync()
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=errors, env=env)
        _pid, status, usage = os.wait4(process.pid, 0)
        elapsed = time.monotonic() - started
        output.seek(0)
        stdout = output.read()
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit("%s failed: %s %s" % (" ".join(argv[:2]), stdout[-3000:].decode(errors="replace"),
                                                   errors.read()[-2000:].decode(errors="replace")))
    return elapsed, usage.ru_maxrss / 1024, stdout


def role_summary(tasks):
    """The role's qemu_backup_summary fact, from the results callback's {task name: result} of one VM; None when the
    role set none."""
    return next((result["ansible_facts"]["qemu_backup_summary"] for result in tasks.values()
                 if "qemu_backup_summary" in result.get("ansible_facts", {})), None)


def module_runs(result):
    """How many module processes a task's result (as the results callback keeps it) stands for, one per loop item:
    set_fact, debug, assert and the like run on the controller and return no invocation."""
    return sum("invocation" in item for item in result.get("results", [result]))


def role_copies(tasks):
    """The copies of the role's module run that returned them (the whole run, the commit step, or the last round of
    progress of a run that went on in the background)."""
    return next((item["copies"] for result in tasks.values() for item in [result] + result.get("results", [])
                 if isinstance(item, dict) and item.get("copies")), [])


class Copiers:
    def __init__(self, url, workdir, size, connections):
        self.url = url
        self.workdir = workdir
        self.size = size
        self.connections = connections
        self.env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "build", "collections"))

    def output(self, name, extension):
        return os.path.join(self.workdir, "%s.%s" % (name, extension))

    def ours(self, image_format, **extra):
        dest = self.output("ours", image_format)
        args = dict(src=self.url, dest=dest, format=image_format, force=True, connections=self.connections,
                    state_dir=os.path.join(self.workdir, "state"), **extra)
        payload = json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode()
        return [sys.executable, "-m", MODULE], payload, dest

    def nbdcopy_raw(self, durable):
        dest = self.output("nbdcopy", "raw")
        return ["nbdcopy", "-C", str(self.connections)] + (["--flush"] if durable else []) + [self.url, dest], \
            None, dest

    def nbdcopy_qcow2(self, durable):
        dest = self.output("nbdcopy", "qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", dest, str(self.size)], check=True)
        return ["nbdcopy", "-C", str(self.connections), "--destination-is-zero"] + (["--flush"] if durable else []) + \
            [self.url, "--", "[", "qemu-nbd", "--shared", str(self.connections), "-f", "qcow2", dest, "]"], None, dest

    def qemu_img(self, durable):
        # convert's default cache mode is unsafe: nothing is flushed; writeback flushes when it closes the image.
        dest = self.output("qemu-img", "qcow2")
        return ["qemu-img", "convert", "-t", "writeback" if durable else "unsafe", "-f", "raw", "-O", "qcow2", "-W",
                "-m", "16", self.url, dest], None, dest

    def all(self):
        return {
            "fleetbackup qcow2": lambda: self.ours("qcow2"),
            "fleetbackup raw": lambda: self.ours("raw"),
            "nbdcopy raw --flush": lambda: self.nbdcopy_raw(True),
            "nbdcopy qcow2 (qemu-nbd) --flush": lambda: self.nbdcopy_qcow2(True),
            "qemu-img convert qcow2 -t writeback": lambda: self.qemu_img(True),
            "nbdcopy raw (no flush)": lambda: self.nbdcopy_raw(False),
            "qemu-img convert qcow2 (default: no flush)": lambda: self.qemu_img(False),
        }


def run_round_robin(copiers, rounds, reference_image):
    times = {name: [] for name in copiers}
    for round_index in range(rounds):
        order = list(copiers) if round_index % 2 == 0 else list(reversed(copiers))
        for name in order:
            argv, stdin, dest = copiers[name]()
            elapsed, _output = timed(argv, stdin, env=copiers_env(argv))
            times[name].append(elapsed)
            if round_index == 0 and not same(dest, reference_image):
                raise SystemExit("%s produced an image that differs from the disk" % name)
            os.unlink(dest)
    return times


def copiers_env(argv):
    return dict(os.environ, PYTHONPATH=os.path.join(ROOT, "build", "collections")) if argv[0] == sys.executable \
        else None


def start_backup(vm, scratch, backup_id, **args):
    # Nothing writes to the disk during a bench copy: 10% of the 1 TiB disk would ask for more room than it needs.
    return start_module(vm, scratch, backup_id, scratch_size="1G", **args)["backup"]["disks"][0]


def start_module(vm, scratch, backup_id, **args):
    result = run_module("qemu_backup_start", qmp_socket=vm.qmp_socket, backup_id=backup_id, scratch_dir=scratch,
                        state_dir=os.path.join(scratch, "..", "state"), **args)
    if result.failed:
        raise SystemExit(result["msg"])
    return result


def stop_backup(vm, scratch, backup_id):
    result = run_module("qemu_backup_stop", qmp_socket=vm.qmp_socket, backup_id=backup_id,
                        state_dir=os.path.join(scratch, "..", "state"))
    if result.failed or result["intact"] is not True:
        raise SystemExit("stop failed: %s" % result)


def bench_transports(vm, scratch, workdir, size, rounds, connections):
    """The full qcow2 copy of one disk over the unix socket, plain TCP and TCP with TLS, in alternating rounds.

    QEMU runs one NBD server, so each copy gets a backup of its own, started (untimed) on the same disk.
    Returns ({transport: [seconds]}, bytes read).
    """
    certificates = FleetCertificates(os.path.join(workdir, "tls"))
    rc, _results, output = certificates.make()
    if rc != 0:
        raise SystemExit("the fleet_ca playbook failed: %s" % output[-3000:])
    transports = {
        "unix socket": {},
        "TCP, plain (loopback)": dict(nbd_tcp=dict(host="127.0.0.1", plain=True)),
        "TCP with TLS": dict(nbd_tcp=dict(host=HYPERVISOR_ADDRESS, tls_dir=certificates.tls_dir("hv1"),
                                          tls_allow=[certificates.dn("backup")])),
    }
    times = {name: [] for name in transports}
    reference = vm.flushed_image("vda")
    for round_index in range(rounds):
        order = list(transports) if round_index % 2 == 0 else list(reversed(transports))
        for name in order:
            disk = start_backup(vm, scratch, "bench-net", **transports[name])
            copier = Copiers(disk["url"], os.path.join(workdir, "net"), size, connections)
            os.makedirs(copier.workdir, exist_ok=True)
            tls = dict(tls_certificates=certificates.tls_dir("backup")) if name == "TCP with TLS" else {}
            argv, stdin, dest = copier.ours("qcow2", **tls)
            elapsed, output = timed(argv, stdin, env=copiers_env(argv))
            times[name].append(elapsed)
            if round_index == 0 and not same(dest, reference):
                raise SystemExit("the copy over the %s differs from the disk" % name)
            os.unlink(dest)
            stop_backup(vm, scratch, "bench-net")
    return times, json.loads(output)["bytes_read"]


def report_transports(times, bytes_read):
    print()
    print("| full qcow2 copy over | median s | data MiB/s | vs unix socket |")
    print("| --- | ---: | ---: | ---: |")
    unix = statistics.median(times["unix socket"])
    for name, values in times.items():
        median = statistics.median(values)
        print("| %s | %.2f | %.0f | %.2f |" % (name, median, bytes_read / MiB / median, median / unix))


def bench_start_stop(workdir, scratch, rounds):
    """Median wall time of the start and stop modules, and the vCPU pause, for a running VM of 1 and of 4 disks."""
    results = {}
    for disks in (1, 4):
        path = os.path.join(workdir, "disks%d" % disks)
        os.makedirs(path)
        vm = Vm(path, [DiskSpec("vd%s" % "abcd"[index], size=GiB) for index in range(disks)]).start()
        try:
            starts, stops, pauses = [], [], []
            for index in range(rounds):
                began = time.monotonic()
                started = start_module(vm, scratch, "bench-%d" % index, checkpoint="c%d" % index)
                pauses.append(started["backup"]["pause"])
                starts.append(time.monotonic() - began)
                began = time.monotonic()
                stop_backup(vm, scratch, "bench-%d" % index)
                stops.append(time.monotonic() - began)
        finally:
            vm.kill()
        results[disks] = (statistics.median(pauses), max(pauses), statistics.median(starts), statistics.median(stops))
    return results


def report_start_stop(results, rounds):
    print()
    print("| disks | vCPU pause, median ms | pause, max ms | start module, median s | stop module, median s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for disks, (pause, longest, start, stop) in results.items():
        print("| %d | %.1f | %.1f | %.2f | %.2f |" % (disks, pause * 1000, longest * 1000, start, stop))
    print("(%d rounds each; every start opens a checkpoint, so its bitmap transaction is inside the pause)" % rounds)


def disk_arguments(description):
    """The parser of the options every bench of the 8 GiB disk takes: its size, its data, rounds, connections."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size-gib", type=int, default=8)
    parser.add_argument("--data-gib", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    return parser


def main():
    parser = disk_arguments(__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="default: a new directory under build/")
    parser.add_argument("--only-start-stop", action="store_true", help="only time the start and stop modules")
    parser.add_argument("--only-transports", action="store_true",
                        help="only the copy over the unix socket, plain TCP and TLS")
    parser.add_argument("--only-libvirt", action="store_true", help="only the libvirt roles beside virtnbdbackup")
    parser.add_argument("--libvirt-rounds", type=int, default=3)
    parser.add_argument("--libvirt-disk-mib", type=int, default=4096, help="the libvirt domain's disk")
    parser.add_argument("--libvirt-data-mib", type=int, default=1024, help="the data on the libvirt domain's disk")
    parser.add_argument("--only-fleet", action="store_true",
                        help="only the fleet playbook over SSH, repositories on the hypervisors and over TLS")
    parser.add_argument("--fleet-rounds", type=int, default=2)
    parser.add_argument("--fleet-settings-rounds", type=int, default=2,
                        help="rounds of the fleet's incremental under each of the Ansible settings compared (0: none)")
    parser.add_argument("--fleet-disk-mib", type=int, default=2048, help="each fleet VM's disk")
    parser.add_argument("--fleet-data-mib", type=int, default=512, help="the data on each fleet VM's disk")
    parser.add_argument("--quiet-load", type=float, default=1.0,
                        help="before each round of the libvirt and fleet parts, wait (up to 15 minutes) until the"
                             " 1-minute load average is below this; 0: do not wait")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-", dir=os.path.join(ROOT, "build"))
    os.makedirs(workdir, exist_ok=True)
    scratch = os.path.join(workdir, "scratch")
    os.makedirs(scratch, exist_ok=True)
    size, data = args.size_gib * GiB, args.data_gib * GiB
    vms = []
    try:
        if args.only_libvirt:
            bench_and_report_libvirt(workdir, args)
            return
        if args.only_fleet:
            bench_and_report_fleet(workdir, args)
            return
        if args.only_transports:
            vm = make_vm(workdir, "vm", size)
            build_disk(vm, "vda", size, data)
            vms.append(vm.start())
            report_transports(*bench_transports(vm, scratch, workdir, size, args.rounds, args.connections))
            return
        print("Timing start and stop of a running VM with 1 and 4 disks...", flush=True)
        start_stop = bench_start_stop(workdir, scratch, 10)
        report_start_stop(start_stop, 10)
        if args.only_start_stop:
            return
        print("Building a %d GiB disk with %d GiB of data..." % (args.size_gib, args.data_gib), flush=True)
        vm = make_vm(workdir, "vm", size)
        build_disk(vm, "vda", size, data)
        vms.append(vm.start())
        disk = start_backup(vm, scratch, "bench-full", checkpoint="c1")
        reference = vm.flushed_image("vda")
        copiers = Copiers(disk["url"], workdir, size, args.connections)
        print("Timing %d rounds, alternating the order..." % args.rounds, flush=True)
        times = run_round_robin(copiers.all(), args.rounds, reference)
        memory = {}
        for name, make in copiers.all().items():
            argv, stdin, dest = make()
            memory[name] = peak_rss_mib(argv, stdin, env=copiers_env(argv))
            os.unlink(dest)

        # The incremental: 1% of the disk dirty, in 1 MiB writes spread over it.
        argv, stdin, base = copiers.ours("qcow2")
        full_engine = json.loads(timed(argv, stdin, env=copiers_env(argv))[1])["elapsed"]
        stop_backup(vm, scratch, "bench-full")
        dirty_writes = size // 100 // MiB
        for index in range(dirty_writes):
            vm.write("vda", (index * (size // dirty_writes)) // MiB * MiB, MiB, 0xE0 + index % 16)
        incremental = start_backup(vm, scratch, "bench-inc", incremental="c1")
        inc_copiers = Copiers(incremental["url"], os.path.join(workdir, "inc"), size, args.connections)
        os.makedirs(inc_copiers.workdir)
        inc_times = []
        for _round in range(args.rounds):
            argv, stdin, dest = inc_copiers.ours("qcow2", dirty_bitmap=incremental["dirty_bitmap"], backing=base)
            elapsed, output = timed(argv, stdin, env=copiers_env(argv))
            inc_result = json.loads(output)
            inc_times.append((elapsed, inc_result["elapsed"]))
        if not same(dest, vm.flushed_image("vda")):
            raise SystemExit("the incremental does not restore the disk")
        stop_backup(vm, scratch, "bench-inc")
        print("Timing the copy over the unix socket, plain TCP and TLS, %d rounds..." % args.rounds, flush=True)
        transports = bench_transports(vm, scratch, workdir, size, args.rounds, args.connections)
        vm.kill()

        # Memory on a 64 GiB disk with the same data, and the map of a 1 TiB sparse disk.
        big = make_vm(workdir, "big", 64 * GiB)
        build_disk(big, "vda", 64 * GiB, data)
        sparse = make_vm(workdir, "sparse", 1024 * GiB)
        results_big = {}
        for label, machine in (("64 GiB disk, %d GiB data" % args.data_gib, big), ("1 TiB sparse disk", sparse)):
            vms.append(machine.start())
            other = start_backup(machine, scratch, "bench-big")
            copier = Copiers(other["url"], workdir, machine.disks["vda"].size, args.connections)
            argv, stdin, dest = copier.ours("qcow2")
            elapsed, output = timed(argv, stdin, env=copiers_env(argv))
            results_big[label] = (elapsed, peak_rss_mib(argv, stdin, env=copiers_env(argv)))
            os.unlink(dest)
            stop_backup(machine, scratch, "bench-big")
            machine.kill()
        report(times, memory, inc_times, inc_result, full_engine, results_big, data, size)
        report_transports(*transports)
        bench_and_report_libvirt(workdir, args)
        bench_and_report_fleet(workdir, args)
    finally:
        for machine in vms:
            machine.kill()
        if not args.workdir:
            shutil.rmtree(workdir)  # gigabytes of images; a --workdir given is the caller's to keep


def bench_and_report_libvirt(workdir, args):
    from libvirt_bench import bench_libvirt, report_libvirt  # needs python3-libvirt, which the QMP part does not

    size, data, rounds = args.libvirt_disk_mib * MiB, args.libvirt_data_mib * MiB, args.libvirt_rounds
    print("Backing up a libvirt domain with the role, the module alone and virtnbdbackup, %d rounds..." % rounds,
          flush=True)
    libvirt_dir = tempfile.mkdtemp(prefix="lv-", dir=workdir)  # short: QEMU's sockets are under it
    report_libvirt(bench_libvirt(libvirt_dir, size, data, rounds, args.quiet_load), size, data, rounds)


def bench_and_report_fleet(workdir, args):
    from fleet_bench import bench_fleet, report_fleet  # needs root: sshds of its own, as the SSH fleet tests

    size, data, rounds = args.fleet_disk_mib * MiB, args.fleet_data_mib * MiB, args.fleet_rounds
    print("Backing up a fleet (2 hypervisors x 4 VMs over SSH), repositories local and over TLS, %d rounds, then"
          " %d rounds of each Ansible setting..." % (rounds, args.fleet_settings_rounds), flush=True)
    fleet_dir = tempfile.mkdtemp(prefix="fleet-", dir=workdir)
    results = bench_fleet(fleet_dir, size, data, rounds, args.fleet_settings_rounds, args.quiet_load)
    report_fleet(results, size, data, rounds, args.fleet_settings_rounds)


def report(times, memory, inc_times, inc_result, full_engine, results_big, data, size):
    median = {name: statistics.median(values) for name, values in times.items()}
    print()
    print("| copier | median s | data MiB/s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for name in times:
        print("| %s | %.2f | %.0f | %.0f |" % (name, median[name], data / MiB / median[name], memory[name]))
    inc_wall = statistics.median(t[0] for t in inc_times)
    inc_engine = statistics.median(t[1] for t in inc_times)
    print("| fleetbackup incremental qcow2, 1%% dirty | %.2f | %.0f | |"
          % (inc_wall, inc_result["bytes_read"] / MiB / inc_wall))
    for label, (elapsed, rss) in results_big.items():
        print("| fleetbackup qcow2, %s | %.2f | | %.0f |" % (label, elapsed, rss))
    ours = median["fleetbackup qcow2"]
    print()
    checks = [
        ("full qcow2 / qemu-img convert -t writeback", ours / median["qemu-img convert qcow2 -t writeback"], 1.0),
        ("full qcow2 / nbdcopy raw --flush", ours / median["nbdcopy raw --flush"], 1.2),
        ("full raw / nbdcopy raw --flush", median["fleetbackup raw"] / median["nbdcopy raw --flush"], 1.2),
        ("full qcow2 / nbdcopy qcow2 --flush", ours / median["nbdcopy qcow2 (qemu-nbd) --flush"], 1.2),
        ("incremental 1% / full, copy engine", inc_engine / full_engine, 0.05),
        ("incremental 1% / full, whole module run", inc_wall / ours, 0.05),
        ("full qcow2 / qemu-img convert (no flush)", ours / median["qemu-img convert qcow2 (default: no flush)"], 1.0),
        ("full qcow2 / nbdcopy raw (no flush)", ours / median["nbdcopy raw (no flush)"], 1.2),
    ]
    for label, ratio, target in checks:
        print("%-44s %6.3f  target <= %.2f  %s" % (label, ratio, target, "met" if ratio <= target else "MISSED"))
    print("incremental bytes read: %d (%.2f%% of the disk); copy engine %.3f s of %.3f s"
          % (inc_result["bytes_read"], 100.0 * inc_result["bytes_read"] / size, inc_engine, inc_wall))


if __name__ == "__main__":
    main()
