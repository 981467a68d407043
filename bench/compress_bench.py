"""make bench-storage, compression's part: the full qcow2 copy of realistic data (an ext4 copy of /usr in an 8 GiB
disk, usr_disk.py) uncompressed against compress=zstd, its size and its time.

The copy engine copies from a read-only qemu-nbd export of the raw disk, in a process of its own, as qemu_backup_copy
would; every variant runs alternately, several rounds, and the medians count. Each variant's first image is checked
with qemu-img check and compared with the disk by qemu-img compare. Sizes are the bytes the image files take on disk.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench import GiB, MiB, ROOT, timed
from checksum_bench import alternate
from support.processes import end_process
from support.qemu_vm import same
from usr_disk import usr_disk

# One full copy in a child process: its seconds (to durable), and the CPU seconds of its threads.
ENGINE_RUN = """
import json, resource, sys, time
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd import engine
src, dest, size, connections, level = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
started = time.monotonic()
result = engine.copy_to_image(src, dest, "qcow2", size, connections=connections,
                              compression_level=None if level == "none" else int(level))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(seconds=time.monotonic() - started, cpu=usage.ru_utime + usage.ru_stime,
                      bytes_read=result.bytes_read)))
"""
# The variant that stores clusters as they are, as compress: none.
UNCOMPRESSED = "none"
# The targets of issue 20: compressed size and time against the uncompressed full's.
SIZE_TARGET = 0.6
TIME_TARGET = 1.3


def serve(disk, workdir, connections):
    """A read-only qemu-nbd export of the raw disk, as a multi-conn server; (its NBD URL, its pid)."""
    socket, pid_file = os.path.join(workdir, "nbd.sock"), os.path.join(workdir, "qemu-nbd.pid")
    # --fork returns once the socket listens.
    subprocess.run(["qemu-nbd", "--read-only", "--format=raw", "--shared=%d" % connections, "--persistent", "--fork",
                    "--pid-file", pid_file, "--socket", socket, "--export-name", "usr", disk], check=True)
    with open(pid_file) as stream:
        return "nbd+unix:///usr?socket=%s" % socket, int(stream.read())


def allocated(path):
    return os.stat(path).st_blocks * 512


def checked_compressed(image, compressed):
    """qemu-img check's compressed clusters of image, failing the bench on any error."""
    checked = subprocess.run(["qemu-img", "check", "--output=json", image], stdout=subprocess.PIPE, text=True,
                             check=False)
    report = json.loads(checked.stdout or "{}")
    if checked.returncode != 0 or report.get("corruptions") or report.get("leaks"):
        raise SystemExit("qemu-img check found errors in %s: %s" % (image, checked.stdout))
    if compressed != bool(report.get("compressed-clusters")):
        raise SystemExit("%s holds %s compressed clusters" % (image, report.get("compressed-clusters", 0)))
    return report.get("compressed-clusters", 0)


def bench(url, disk, workdir, variants, connections, rounds):
    """{variant: [run]} of full copies, each run its seconds, CPU seconds, allocated bytes (and, once, checks)."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "build", "collections"))
    size = os.path.getsize(disk)
    runs = {variant: [] for variant in variants}

    def copy(variant):
        def run():
            dest = os.path.join(workdir, "copy.qcow2")
            _elapsed, output = timed([sys.executable, "-c", ENGINE_RUN, url, dest, str(size), str(connections),
                                      variant], env=env)
            result = dict(json.loads(output), allocated=allocated(dest))
            if not runs[variant]:
                result["compressed_clusters"] = checked_compressed(dest, variant != UNCOMPRESSED)
                if not same(dest, disk):
                    raise SystemExit("the %s copy differs from the disk" % variant)
            os.unlink(dest)
            runs[variant].append(result)
            return result["seconds"]
        return run

    alternate({variant: copy(variant) for variant in variants}, rounds)
    return runs


def summary(runs):
    """Medians of each variant, and its ratios to the uncompressed copy."""
    medians = {variant: {key: statistics.median(run[key] for run in values) for key in ("seconds", "cpu", "allocated")}
               for variant, values in runs.items()}
    plain = medians[UNCOMPRESSED]
    for values in medians.values():
        values.update(size_ratio=values["allocated"] / plain["allocated"], time_ratio=values["seconds"] / plain["seconds"])
    return medians


def report(medians, data, loads):
    print()
    print("| full copy | median s | data MiB/s | median CPU s | image MiB | size / uncompressed | time / uncompressed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, values in medians.items():
        print("| %s | %.2f | %.0f | %.2f | %.0f | %.3f | %.3f |" % (
            "uncompressed" if variant == UNCOMPRESSED else "zstd level %s" % variant, values["seconds"],
            data / MiB / values["seconds"], values["cpu"], values["allocated"] / MiB, values["size_ratio"],
            values["time_ratio"]))
    print()
    for variant, values in medians.items():
        if variant == UNCOMPRESSED:
            continue
        for label, ratio, target in (("size", values["size_ratio"], SIZE_TARGET),
                                     ("time", values["time_ratio"], TIME_TARGET)):
            print("zstd level %-3s %s / uncompressed: %6.3f  target <= %.2f  %s"
                  % (variant, label, ratio, target, "met" if ratio <= target else "MISSED"))
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f" % (loads[0] + loads[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--levels", default="1,3", help="zstd levels to time beside the uncompressed copy")
    parser.add_argument("--disk", help="a raw disk to copy instead of usr_disk()'s")
    parser.add_argument("--json", help="where to write the results as JSON, besides stdout")
    args = parser.parse_args()
    disk = args.disk or usr_disk()
    workdir = tempfile.mkdtemp(prefix="bench-compress-", dir=os.path.join(ROOT, "build"))
    loads = [os.getloadavg()]
    pid = None
    try:
        url, pid = serve(disk, workdir, args.connections)
        variants = [UNCOMPRESSED] + args.levels.split(",")
        print("Timing full copies of %s (%.1f GiB of data), %s, %d rounds..."
              % (disk, allocated(disk) / GiB, " and ".join(variants), args.rounds), flush=True)
        runs = bench(url, disk, workdir, variants, args.connections, args.rounds)
    finally:
        if pid is not None:
            end_process(pid)
        shutil.rmtree(workdir)
    loads.append(os.getloadavg())
    medians = summary(runs)
    data = runs[UNCOMPRESSED][0]["bytes_read"]
    results = dict(disk=disk, data_bytes=data, rounds=args.rounds, connections=args.connections, runs=runs,
                   medians=medians, load_before=loads[0], load_after=loads[1])
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=1)
    report(medians, data, loads)


if __name__ == "__main__":
    main()
