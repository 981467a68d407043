"""The qcow2 writer's images, checked by qemu-img: structure (check), content (compare) and backing."""

import json
import os
import subprocess

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils.qcow2_writer import CLUSTER_SIZE, REGION, Qcow2Writer

MiB = 1024 ** 2


def qemu_img(*args):
    return subprocess.run(["qemu-img"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check(path):
    result = qemu_img("check", "--output=json", path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def reference(path, size, commands, image_format="raw", backing=None):
    args = ["create", "-q", "-f", image_format]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    assert qemu_img(*(args + [path, str(size)])).returncode == 0
    for command in commands:
        subprocess.run(["qemu-io", "-f", image_format, "-c", command, path], check=True, stdout=subprocess.DEVNULL)
    return path


def test_data_across_regions_out_of_order_with_a_partial_last_cluster(tmp_path):
    size = 2 * REGION + 3 * CLUSTER_SIZE + 512
    path = str(tmp_path / "out.qcow2")
    writer = Qcow2Writer(path, size)
    writes = [(REGION + 5 * CLUSTER_SIZE, 0x22, 3 * CLUSTER_SIZE), (0, 0x11, 2 * CLUSTER_SIZE),
              (2 * REGION + 3 * CLUSTER_SIZE, 0x33, 512), (REGION - CLUSTER_SIZE, 0x44, 2 * CLUSTER_SIZE)]
    for offset, pattern, length in writes:
        writer.write(bytes([pattern]) * length, offset)
    writer.region_done(0)  # tables may go out early, in any order
    writer.finish()
    writer.close()
    assert os.stat(path).st_mode & 0o777 == 0o600
    report = check(path)
    assert report["allocated-clusters"] == 8
    expected = reference(str(tmp_path / "ref.raw"), size,
                         ["write -P 0x%x %d %d" % (pattern, offset, length) for offset, pattern, length in writes])
    assert qemu_img("compare", path, expected).returncode == 0


def test_overlay_with_zero_clusters_hides_the_backing_data(tmp_path):
    reference(str(tmp_path / "base.qcow2"), 8 * MiB, ["write -P 0xaa 0 8M"], image_format="qcow2")
    path = str(tmp_path / "top.qcow2")
    writer = Qcow2Writer(path, 8 * MiB, backing="base.qcow2", backing_format="qcow2")
    writer.write(b"\x55" * CLUSTER_SIZE, MiB)
    writer.zero(2 * MiB, 3 * MiB)
    writer.finish()
    writer.close()
    check(path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    expected = reference(str(tmp_path / "expected.raw"), 8 * MiB,
                         ["write -P 0xaa 0 8M", "write -P 0x55 1M 64k", "write -z 2M 3M"])
    assert qemu_img("compare", path, expected).returncode == 0


def test_an_image_without_its_header_is_no_image(tmp_path):
    path = str(tmp_path / "dead.qcow2")
    writer = Qcow2Writer(path, 4 * MiB)
    writer.write(b"\x01" * CLUSTER_SIZE, 0)
    writer.close()  # killed before finish()
    assert qemu_img("info", "-f", "qcow2", path).returncode != 0
    with pytest.raises(FileExistsError):
        Qcow2Writer(path, 4 * MiB)
