"""make bench, the checksum's part: on one export of an 8 GiB disk with 2 GiB of data, the full qcow2 copy (which sums
the checksum) against nbdcopy raw, the verify of that backup against nbdcopy of the same image to null:, and the
checksum's share of a copy's CPU.

Every pair runs alternately, several rounds; the copy's output is checked with qemu-img compare. The verify and
its nbdcopy read the image once with its pages dropped from the page cache (from disk) and once cached.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench import GiB, MiB, ROOT, Copiers, build_disk, copiers_env, disk_arguments, make_vm, start_backup, stop_backup, timed
from support.qemu_vm import same

VERIFY_MODULE = "ansible_collections.fleetbackup.qemu.plugins.modules.qemu_backup_verify"
# A copy in this process's own child, its checksum as the argument says: xxh3 (new copies), sha256 (old), none.
ENGINE_RUN = """
import json, resource, sys, time
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd import checksum, engine
src, dest, size, which = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

class NoSum(checksum.BlockSum):
    def add_data(self, buf, offset):
        pass
    add_zeros = add_data
    def new_share(self):
        return NoSum(self.algorithm, self.overlay)

chosen = dict(xxh3=checksum.XXH3_128, sha256=checksum.SHA256).get(which, checksum.CURRENT)
engine.BlockSum = lambda algorithm, overlay: (NoSum if which == "none" else checksum.BlockSum)(chosen, overlay)
started = time.monotonic()
result = engine.copy_to_image(src, dest, "qcow2", size)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(seconds=time.monotonic() - started, cpu=usage.ru_utime + usage.ru_stime,
                      checksum=result.checksum)))
"""


def drop_cached(path):
    """Drop the file's pages from the page cache (only its own), so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def alternate(runs, rounds):
    """{name: [seconds]} of runs {name: function returning seconds}, alternating their order each round."""
    times = {name: [] for name in runs}
    for round_index in range(rounds):
        for name in (list(runs) if round_index % 2 == 0 else list(reversed(runs))):
            times[name].append(runs[name]())
    return times


def bench_copy(copiers, reference, rounds):
    """The full qcow2 copy module against nbdcopy raw --flush; returns (times, the qcow2 image of the last copy)."""
    outputs = {}

    def run(name, make):
        def timed_run():
            argv, stdin, dest = make()
            if os.path.exists(dest):
                os.unlink(dest)  # each copy writes a new file
            elapsed, output = timed(argv, stdin, env=copiers_env(argv))
            if name not in outputs and not same(dest, reference):
                raise SystemExit("%s produced an image that differs from the disk" % name)
            outputs[name] = output
            return elapsed
        return timed_run

    times = alternate({"full qcow2 copy": run("full qcow2 copy", lambda: copiers.ours("qcow2")),
                       "nbdcopy raw --flush": run("nbdcopy raw --flush", lambda: copiers.nbdcopy_raw(True))}, rounds)
    return times, copiers.output("ours", "qcow2"), json.loads(outputs["full qcow2 copy"])["checksum"]


def make_repository(workdir, image, checksum, size):
    """A repository whose VM vm1 has one full backup: the image, moved in, and its manifest."""
    directory = os.path.join(workdir, "repository", "vm1")
    os.makedirs(directory)
    name = "b1.vda.qcow2"
    os.rename(image, os.path.join(directory, name))
    backup = dict(name="b1", level="full", chain="b1", finished=time.time(),
                  disks=[dict(disk="vda", file=name, size=size, format="qcow2", checksum=checksum, mode="full")])
    with open(os.path.join(directory, "manifest.json"), "w") as stream:
        json.dump(dict(format=1, vm="vm1", backups=[backup]), stream)
    return os.path.dirname(directory), os.path.join(directory, name)


def bench_verify(repository, image, connections, rounds):
    """The verify module against nbdcopy of the image (through qemu-nbd) to null:, from disk and cached.

    Returns ({name: [seconds]}, the verify's last result).
    """
    results = []
    payload = json.dumps({"ANSIBLE_MODULE_ARGS": dict(repository=repository, vm="vm1")}).encode()
    verify_argv = [sys.executable, "-m", VERIFY_MODULE]
    nbdcopy_argv = ["nbdcopy", "-C", str(connections), "--", "[", "qemu-nbd", "--read-only", "--shared",
                    str(connections), "-f", "qcow2", image, "]", "null:"]

    def run(argv, stdin, cold):
        def timed_run():
            if cold:
                drop_cached(image)
            elapsed, output = timed(argv, stdin, env=copiers_env(argv))
            if argv is verify_argv:
                results.append(json.loads(output))
                if results[-1].get("failed"):
                    raise SystemExit("verify failed: %s" % results[-1]["msg"])
            return elapsed
        return timed_run

    times = {}
    for label, cold in (("from disk", True), ("cached", False)):
        times.update(alternate({"verify, %s" % label: run(verify_argv, payload, cold),
                                "nbdcopy to null:, %s" % label: run(nbdcopy_argv, None, cold)}, rounds))
    return times, results[-1]


def bench_checksum_cpu(url, workdir, size, rounds):
    """The copy engine alone, in a process of its own, with the checksum (xxh3, and the old sha256) and without.

    Returns {which: [(seconds, CPU seconds of the copying process)]}.
    """
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "build", "collections"))
    dest = os.path.join(workdir, "engine.qcow2")
    results = {which: [] for which in ("xxh3", "none", "sha256")}

    def engine_run(which):
        def run():
            _elapsed, output = timed([sys.executable, "-c", ENGINE_RUN, url, dest, str(size), which], env=env)
            os.unlink(dest)
            results[which].append(json.loads(output))
            return results[which][-1]["seconds"]
        return run

    alternate({which: engine_run(which) for which in results}, rounds)
    return results


def report(copy_times, verify_times, verify_result, cpu, data, loads):
    median = {name: statistics.median(values) for name, values in dict(copy_times, **verify_times).items()}
    print()
    print("| run | median s | data MiB/s | rounds |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in dict(copy_times, **verify_times).items():
        print("| %s | %.2f | %.0f | %d |" % (name, median[name], data / MiB / median[name], len(values)))
    print("verify's own read rate (its result's read_rate), last run: %.0f MiB/s over %.0f MiB"
          % (verify_result["read_rate"] / MiB, verify_result["bytes_read"] / MiB))
    print()
    print("| copy engine alone, checksum | median s | median CPU s |")
    print("| --- | ---: | ---: |")
    cpu_median = {}
    for which, values in cpu.items():
        cpu_median[which] = statistics.median(value["cpu"] for value in values)
        print("| %s | %.2f | %.2f |" % (which, statistics.median(value["seconds"] for value in values),
                                        cpu_median[which]))
    print()
    checks = [
        ("full qcow2 copy / nbdcopy raw --flush", median["full qcow2 copy"] / median["nbdcopy raw --flush"], 1.1),
        ("verify / nbdcopy to null:, from disk", median["verify, from disk"] / median["nbdcopy to null:, from disk"],
         1.2),
        ("verify / nbdcopy to null:, cached", median["verify, cached"] / median["nbdcopy to null:, cached"], 1.2),
    ]
    for label, ratio, target in checks:
        print("%-44s %6.3f  target <= %.2f  %s" % (label, ratio, target, "met" if ratio <= target else "MISSED"))
    for which in ("xxh3", "sha256"):
        share = (cpu_median[which] - cpu_median["none"]) / cpu_median[which]
        print("checksum %-6s share of the copy process's CPU: %4.1f%% (%.2f s of %.2f s)"
              % (which, 100 * share, cpu_median[which] - cpu_median["none"], cpu_median[which]))
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (loads[0] + loads[1]))


def main():
    args = disk_arguments(__doc__.splitlines()[0]).parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-checksum-", dir=os.path.join(ROOT, "build"))
    size, data = args.size_gib * GiB, args.data_gib * GiB
    scratch = os.path.join(workdir, "scratch")
    os.makedirs(scratch)
    loads = [os.getloadavg()]
    vm = make_vm(workdir, "vm", size)
    try:
        print("Building a %d GiB disk with %d GiB of data..." % (args.size_gib, args.data_gib), flush=True)
        build_disk(vm, "vda", size, data)
        vm.start()
        disk = start_backup(vm, scratch, "bench-checksum")
        copiers = Copiers(disk["url"], workdir, size, args.connections)
        print("Timing the copies, %d rounds..." % args.rounds, flush=True)
        copy_times, image, checksum = bench_copy(copiers, vm.flushed_image("vda"), args.rounds)
        print("Timing the copy engine with and without the checksum, %d rounds..." % args.rounds, flush=True)
        cpu = bench_checksum_cpu(disk["url"], workdir, size, args.rounds)
        stop_backup(vm, scratch, "bench-checksum")
        vm.kill()
        repository, image = make_repository(workdir, image, checksum, size)
        print("Timing the verify, %d rounds from disk and %d cached..." % (args.rounds, args.rounds), flush=True)
        verify_times, verify_result = bench_verify(repository, image, args.connections, args.rounds)
        loads.append(os.getloadavg())
        report(copy_times, verify_times, verify_result, cpu, data, loads)
    finally:
        vm.kill()
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
