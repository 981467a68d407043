"""make bench-storage, encryption's part: the full copy of the usr disk (an ext4 copy of /usr in 8 GiB, usr_disk.py)
plain, against the same copy encrypted (qcow2 LUKS, written through QEMU), alternately, several rounds; medians.

The disk is served read-only by qemu-nbd with 4 connections, as a backup's export would be. The encrypted copy takes
the default key slot (iter_time 2000 ms) and, to show what that fixed cost is, a fast one (10 ms). Every copy's
output is checked with qemu-img compare against the disk, the encrypted ones given the secret.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

from bench import MiB, ROOT, Copiers, copiers_env, timed
from checksum_bench import alternate
from usr_disk import usr_disk

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import Encryption
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import image_info, images_equal, served

SECRET = b"bench secret, not a passphrase to guard"
TARGET = 1.3  # encrypted full / plain full, issue 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    disk = usr_disk()
    size = os.stat(disk).st_size
    workdir = tempfile.mkdtemp(prefix="bench-encrypt-", dir=os.path.join(ROOT, "build"))
    try:
        secret_file = os.path.join(workdir, "secret")
        with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as stream:
            stream.write(SECRET)
        with served(disk) as url:
            copiers = Copiers(url, workdir, size, args.connections)
            results = {}

            def run(name, **extra):
                def timed_run():
                    argv, stdin, dest = copiers.ours("qcow2", **extra)
                    if os.path.exists(dest):
                        os.unlink(dest)
                    elapsed, output = timed(argv, stdin, env=copiers_env(argv))
                    results[name] = json.loads(output)
                    encryption = Encryption(SECRET) if extra else None
                    if bool(image_info(dest).get("encrypted")) != bool(extra):
                        raise SystemExit("%s: the image is not what was asked for" % name)
                    if name not in results.get("checked", ()) and not images_equal(disk, dest, encryption):
                        raise SystemExit("%s produced an image that differs from the disk" % name)
                    results.setdefault("checked", set()).add(name)
                    print("  %s: %.2f s" % (name, elapsed), flush=True)
                    return elapsed
                return timed_run

            print("Timing full copies of %s (%d GiB), %d rounds..." % (disk, size >> 30, args.rounds), flush=True)
            times = alternate({
                "plain": run("plain"),
                "encrypted, iter_time 2000": run("encrypted, iter_time 2000",
                                                 encryption=dict(secret_file=secret_file)),
                "encrypted, iter_time 10": run("encrypted, iter_time 10",
                                               encryption=dict(secret_file=secret_file, iter_time=10)),
            }, args.rounds)
        data = results["plain"]["bytes_read"]
        median = {name: statistics.median(values) for name, values in times.items()}
        print()
        print("| full copy, %.0f MiB of data | median s | data MiB/s | rounds |" % (data / MiB))
        print("| --- | ---: | ---: | ---: |")
        for name, values in times.items():
            print("| %s | %.2f | %.0f | %d |" % (name, median[name], data / MiB / median[name], len(values)))
        print()
        for name in ("encrypted, iter_time 2000", "encrypted, iter_time 10"):
            ratio = median[name] / median["plain"]
            print("%-44s %6.3f  target <= %.2f  %s" % (name + " / plain", ratio, TARGET,
                                                       "met" if ratio <= TARGET else "MISSED"))
        print("key slot's fixed cost (iter_time 2000 - iter_time 10): %.2f s"
              % (median["encrypted, iter_time 2000"] - median["encrypted, iter_time 10"]))
        print("load average (1, 5, 15 min) after: %.2f %.2f %.2f" % os.getloadavg())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
