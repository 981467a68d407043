"""The storage benches' realistic data: an ext4 file system made with mke2fs -d from a copy of this machine's /usr,
inside a raw disk of 8 GiB. Built once into build/bench-data and reused while /usr's package list is the same."""

import hashlib
import os
import subprocess
import tempfile

from bench import GiB, ROOT

DATA_DIR = os.path.join(ROOT, "build", "bench-data")
SIZE = 8 * GiB


def _packages_digest():
    """What decides /usr's contents: the installed packages and their versions."""
    listing = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n"], check=True,
                             capture_output=True).stdout
    return hashlib.sha256(listing).hexdigest()[:16]


def usr_disk():
    """The path of the raw 8 GiB disk holding an ext4 copy of /usr, building it when it is missing or stale."""
    os.makedirs(DATA_DIR, mode=0o700, exist_ok=True)
    path = os.path.join(DATA_DIR, "usr-ext4-%s.raw" % _packages_digest())
    if os.path.exists(path):
        return path
    for stale in os.listdir(DATA_DIR):
        if stale.startswith("usr-ext4-"):
            os.unlink(os.path.join(DATA_DIR, stale))
    with tempfile.TemporaryDirectory(dir=DATA_DIR) as scratch:
        copy = os.path.join(scratch, "usr")
        # A copy first: mke2fs -d reading the live /usr could catch a package upgrade half done.
        subprocess.run(["cp", "-a", "--one-file-system", "/usr", copy], check=True)
        building = os.path.join(scratch, "disk.raw")
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", copy, "-E", "root_owner=0:0", building,
                        str(SIZE // 1024) + "k"], check=True)
        os.rename(building, path)
    return path


if __name__ == "__main__":
    print(usr_disk())
