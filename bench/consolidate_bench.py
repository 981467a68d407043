"""make bench-storage, consolidation's part: a chain of a full (the 8 GiB ext4 copy of /usr) and 12 incrementals, each
dirtying about 1% of the disk; the time and the bytes written of dropping one middle point, of merging the oldest
point into a synthetic full (the rolling case of keep_last; a full and 10 incrementals are left), and of merging that
full and its 10 incrementals into one; each full merge beside qemu-img convert of the same chain, just before it.

Remaining points (the rewritten ones and the newest) are compared with qemu-img compare against their views before,
kept by hard links to the old images, and the repository is verified after.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from bench import MiB, ROOT, timed
from usr_disk import usr_disk

from support.flows import image_checksum
from support.modules import run_module

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.checksum import CURRENT
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.images import disk_usage

VM = "vm1"
# Each incremental writes this many 1 MiB extents at random places: about 1% of 8 GiB.
EXTENTS = 82


def qemu_img(*args):
    return subprocess.run(["qemu-img"] + [str(a) for a in args], check=True, capture_output=True, text=True).stdout


def build_chain(directory, incrementals, seed):
    """A repository directory of a full and incrementals with its manifest, as the backup role would record them."""
    size = os.path.getsize(usr_disk())
    rng = random.Random(seed)
    backups = []
    for index in range(incrementals + 1):
        name = "b%02d" % index
        image = os.path.join(directory, "%s.vda.qcow2" % name)
        parent = backups[-1] if backups else None
        if parent is None:
            qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=65536", usr_disk(), image)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-b", parent["disks"][0]["file"], "-F", "qcow2", image)
            writes = []
            for _extent in range(EXTENTS):
                offset = rng.randrange(size // MiB) * MiB
                writes += ["-c", "write -P 0x%02x %d %d" % (rng.randrange(1, 256), offset, MiB)]
            subprocess.run(["qemu-io", "-f", "qcow2", image] + writes, check=True, capture_output=True)
        os.chmod(image, 0o600)
        disk = dict(disk="vda", file=os.path.basename(image), format="qcow2", size=size, mode="incremental" if parent
                    else "full", backing=parent["disks"][0]["file"] if parent else None,
                    checksum=image_checksum(image, CURRENT))
        backups.append(dict(name=name, level=disk["mode"], parent=parent and parent["name"],
                            chain="b00", checkpoint="ckpt-" + name, incremental=parent and parent["checkpoint"],
                            finished=int(time.time()) - (incrementals - index) * 86400, disks=[disk]))
    with open(os.path.join(directory, "manifest.json"), "w") as stream:
        json.dump(dict(format=1, vm=VM, backups=backups), stream)
    return backups


def kept_as_before(directory, into):
    """Hard links of every image into a directory of their own: the chain as it is now, whatever a merge renames over
    the repository's files, for the comparisons after (the backing file names are relative)."""
    os.mkdir(into)
    for name in os.listdir(directory):
        if name.endswith(".qcow2"):
            os.link(os.path.join(directory, name), os.path.join(into, name))


def compare(directory, names, before):
    """qemu-img compare of each point's view now with its view before; the old images are let go after."""
    for name in names:
        qemu_img("compare", "-U", os.path.join(directory, "%s.vda.qcow2" % name),
                 os.path.join(before, "%s.vda.qcow2" % name))
    shutil.rmtree(before)


def reference_convert(directory, top, workdir, what):
    """qemu-img convert of the chain at top into a new qcow2, as a row: the same work without journal or checksum."""
    reference = os.path.join(workdir, "reference.qcow2")
    seconds, _out = timed(["qemu-img", "convert", "-U", "-O", "qcow2", os.path.join(directory, "%s.vda.qcow2" % top),
                           reference])
    written = disk_usage(reference)
    os.unlink(reference)
    return "for reference, qemu-img convert of %s into a new qcow2" % what, seconds, written, written


def consolidate(repository, **rules):
    lease = run_module("qemu_backup_repository", repository=repository, vm=VM, action="lock")
    os.sync()
    started = time.monotonic()
    result = run_module("qemu_backup_repository", repository=repository, vm=VM, action="consolidate",
                        run_id=lease["lease"]["run_id"], **rules)
    seconds = time.monotonic() - started
    assert not result.failed, result
    run_module("qemu_backup_repository", repository=repository, vm=VM, action="unlock", run_id=lease["lease"]["run_id"])
    written = sum(r["bytes_written"] for m in result["consolidated"] for r in m["rewrites"])
    read = sum(r["bytes_read"] for m in result["consolidated"] for r in m["rewrites"])
    return seconds, written, read, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-consolidate-", dir=os.path.join(ROOT, "build"))
    try:
        repository = os.path.join(workdir, "repository")
        directory = os.path.join(repository, VM)
        os.makedirs(directory, mode=0o700)
        print("Building the chain: the /usr disk's full and 12 incrementals of about 1%...", flush=True)
        backups = build_chain(directory, 12, args.seed)
        names = [b["name"] for b in backups]
        full_data = disk_usage(os.path.join(directory, "b00.vda.qcow2"))
        incremental_data = sum(disk_usage(os.path.join(directory, "%s.vda.qcow2" % n)) for n in names[1:])
        rows = []
        before = os.path.join(workdir, "before")
        print("Consolidating...", flush=True)
        kept_as_before(directory, before)
        rows.append(("one middle point dropped (its 1% merged into the next)",)
                    + consolidate(repository, drop=[names[6]])[:3])
        compare(directory, [names[7], names[-1]], before)
        rows.append(reference_convert(directory, names[1], workdir, "the full and 1 incremental"))
        kept_as_before(directory, before)
        rows.append(("oldest point merged into a synthetic full (full + 1 incremental; keep_last: 11, as a rolling "
                     "run does)",) + consolidate(repository, keep_last=11)[:3])
        compare(directory, [names[1], names[-1]], before)
        rows.append(reference_convert(directory, names[-1], workdir, "the full and 10 incrementals"))
        kept_as_before(directory, before)
        rows.append(("a full and its 10 incrementals merged into one full (keep_last: 1)",)
                    + consolidate(repository, keep_last=1)[:3])
        compare(directory, names[-1:], before)
        verified = run_module("qemu_backup_verify", repository=repository)
        assert not verified.failed and all(b["state"] == "ok" for b in verified["vms"][0]["backups"]), verified
        print()
        print("disk 8 GiB; the full holds %.0f MiB, the 12 incrementals %.0f MiB together" % (
            full_data / MiB, incremental_data / MiB))
        print()
        print("| consolidation | seconds | MiB written | MiB read | MiB/s written |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, seconds, written, read in rows:
            print("| %s | %.1f | %.0f | %.0f | %.0f |" % (label, seconds, written / MiB, read / MiB,
                                                          written / MiB / seconds))
        print("load average (1, 5, 15 min) after: %.2f %.2f %.2f" % os.getloadavg())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
