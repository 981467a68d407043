"""Compressed backups (compress=zstd) against real QEMU: qcow2 images that qemu-img checks and reads directly, a
chain that restores and verifies exactly, incompressible data stored plain; by the module, and by the role."""

import json
import os
import subprocess

from support.fleet import Fleet, assert_clean, assert_ok
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB, same

CLUSTER = 64 * 1024


def random_file(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(2 * MiB))
    return str(path)


def checked(image):
    """qemu-img check's report of a compressed image with no error, and its compression type."""
    checked = subprocess.run(["qemu-img", "check", "-U", "--output=json", image], stdout=subprocess.PIPE, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stdout
    report = json.loads(checked.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", image], stdout=subprocess.PIPE,
                                     check=True).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd", info
    return report


def test_a_compressed_chain_checks_restores_and_verifies(vms, tmp_path):
    noise = random_file(tmp_path)

    def prepare(vm):
        vm.write("vda", 0, 8 * MiB, 0x11)
        vm.write_file("vda", 16 * MiB, 2 * MiB, noise)

    vm = vms([DiskSpec("vda")], prepare=prepare)
    repository = tmp_path / "repository"
    repository.mkdir()
    (tmp_path / "scratch").mkdir()
    args = dict(vm.connection_args(), repository=str(repository), vm="vm1", state_dir=str(tmp_path / "state"),
                scratch_dir=str(tmp_path / "scratch"), compress="zstd")
    marks = [vm.mark("vda")]
    assert run_module("qemu_backup", **args)["summary"]["result"] == "ok"
    vm.write("vda", 4 * MiB, MiB, 0x22)
    vm.write_file("vda", 32 * MiB, MiB, noise)
    marks.append(vm.mark("vda"))
    done = run_module("qemu_backup", **dict(args, compress_level=9))
    assert done["summary"]["result"] == "ok" and done["summary"]["level"] == "incremental", done
    assert_clean(vm)
    with open(repository / "vm1" / "manifest.json") as stream:
        backups = json.load(stream)["backups"]
    images = [str(repository / "vm1" / backup["disks"][0]["file"]) for backup in backups]
    # Each image: its compressible clusters compressed, its random ones plain, and it restores the disk exactly.
    for image, (compressed, plain) in zip(images, [(8 * MiB, 2 * MiB), (MiB, MiB)]):
        report = checked(image)
        assert report["compressed-clusters"] == compressed // CLUSTER, report
        assert report["allocated-clusters"] == (compressed + plain) // CLUSTER, report
        assert os.path.getsize(image) < plain + MiB  # the tables, and the packed clusters: a few KiB
    for point, image in enumerate(images):
        assert same(image, vm.expected_image("vda", marks[point], str(tmp_path / "expected.raw")))
    verified = run_module("qemu_backup_verify", repository=str(repository))
    assert not verified.failed and verified["bad_images"] == [] and "all good" in verified["msg"], verified
    restored = tmp_path / "restored"
    restored.mkdir()
    result = run_module("qemu_backup_restore", repository=str(repository), vm="vm1", dest=str(restored))
    assert same(result["disks"][0]["image"], vm.expected_image("vda", marks[1], str(tmp_path / "expected.raw")))


def test_the_role_compresses_with_qemu_backup_compress_alone(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 4 * MiB, 0x33))
    fleet = Fleet(tmp_path, {"vm1": vm})
    mark = vm.mark("vda")
    assert_ok(fleet.backup(qemu_backup_compress="zstd"))
    [image] = fleet.images("vm1")
    report = checked(str(fleet.repository / "vm1" / image))
    assert report["compressed-clusters"] == 4 * MiB // CLUSTER, report
    assert same(str(fleet.repository / "vm1" / image), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))
    assert_clean(vm)
