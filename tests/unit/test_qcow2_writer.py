"""The qcow2 writer's images, checked by qemu-img: structure (check), content (compare) and backing;
and how image files are created and written: safely, and every write checked."""

import errno
import json
import os
import subprocess
import threading

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.targets import FileTarget
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import (
    CLUSTER_SIZE,
    MAX_BACKING_NAME,
    REGION,
    ImageWriteError,
    Qcow2Writer,
    compressed_entry,
    create_image_file,
    host_clusters_of,
)

MiB = 1024 ** 2


def qemu_img(*args):
    return subprocess.run(["qemu-img"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          check=False)


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
    with pytest.raises(ImageWriteError, match="dead.qcow2 already exists"):
        Qcow2Writer(path, 4 * MiB)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277])
def test_image_files_are_created_mode_0600_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        os.close(create_image_file(str(tmp_path / "new.raw")))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new.raw").st_mode & 0o777 == 0o600


@pytest.mark.parametrize("target", [Qcow2Writer, FileTarget])
@pytest.mark.parametrize("planted", ["file", "symlink", "dangling symlink"])
def test_nothing_already_at_the_path_is_written_through_or_replaced(tmp_path, planted, target):
    victim = tmp_path / "victim"
    path = tmp_path / "image.part-1"
    if planted != "dangling symlink":
        victim.write_bytes(b"precious")
    if planted == "file":
        path.write_bytes(b"precious")
    else:
        path.symlink_to(victim)
    with pytest.raises(ImageWriteError, match="image.part-1 already exists.*symbolic link"):
        target(str(path), 4 * MiB)
    assert not os.path.exists(victim) if planted == "dangling symlink" else victim.read_bytes() == b"precious"
    assert path.is_symlink() == (planted != "file")


def test_a_backing_name_longer_than_qcow2_stores_is_refused_before_any_file_is_made(tmp_path):
    path = tmp_path / "top.qcow2"
    with pytest.raises(UserError, match="1024 bytes long, more than the 1023"):
        Qcow2Writer(str(path), 4 * MiB, backing="b" * (MAX_BACKING_NAME + 1))
    assert not path.exists()
    writer = Qcow2Writer(str(path), 4 * MiB, backing="b" * MAX_BACKING_NAME)
    writer.finish()
    writer.close()
    info = json.loads(qemu_img("info", "--output=json", "-U", "--force-share", str(path)).stdout)
    assert info["backing-filename"] == "b" * MAX_BACKING_NAME


def test_metadata_written_in_parts_is_written_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "out.qcow2")
    writer = Qcow2Writer(path, 2 * REGION)
    writer.write(b"\x11" * CLUSTER_SIZE, REGION + CLUSTER_SIZE)
    pwrite = os.pwrite
    # A file that takes at most 1000 bytes a call: the tables, refcounts and header all need several.
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, memoryview(data)[:1000], offset))
    writer.finish()
    writer.close()
    check(path)
    expected = reference(str(tmp_path / "ref.raw"), 2 * REGION, ["write -P 0x11 %d 64k" % (REGION + CLUSTER_SIZE)])
    assert qemu_img("compare", path, expected).returncode == 0


@pytest.mark.parametrize("failure", ["no space", "nothing written"])
def test_a_failed_metadata_write_names_the_file(tmp_path, monkeypatch, failure):
    path = str(tmp_path / "out.qcow2")
    writer = Qcow2Writer(path, 4 * MiB)
    writer.write(b"\x11" * CLUSTER_SIZE, 0)

    def broken(fd, data, offset):
        if failure == "no space":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return 0

    monkeypatch.setattr(os, "pwrite", broken)
    reason = "No space left on device" if failure == "no space" else "the file took none of the bytes"
    with pytest.raises(ImageWriteError, match="Writing .*out.qcow2 at byte [0-9]+ failed: %s" % reason):
        writer.finish()
    writer.close()


def test_compressed_entries_count_the_sectors_beyond_the_first_and_the_host_clusters_they_touch():
    entry = compressed_entry(3 * CLUSTER_SIZE - 100, 613)  # 100 bytes in one sector, 512 in the next, 1 in another
    assert entry >> 62 == 1 and entry & ((1 << 54) - 1) == 3 * CLUSTER_SIZE - 100
    assert (entry >> 54) & 0xff == 2
    assert list(host_clusters_of(3 * CLUSTER_SIZE - 100, 613)) == [2, 3]
    assert list(host_clusters_of(3 * CLUSTER_SIZE - 100, 100)) == [2]


@pytest.mark.parametrize("level", [3, -5])  # -5: one of zstd's fast levels, the same frames for QEMU to read
def test_compressed_image_packs_clusters_that_shrink_and_stores_the_others_plain(tmp_path, level):
    size = 8 * MiB + 512
    path = str(tmp_path / "out.qcow2")
    writer = Qcow2Writer(path, size, compression_level=level)
    incompressible = os.urandom(3 * CLUSTER_SIZE)
    # Clusters of one byte each compress to a few bytes: many share a host cluster, and runs go on into the next.
    writes = [(0, b"".join(bytes([n]) * CLUSTER_SIZE for n in range(1, 17))),
              (2 * MiB, incompressible),
              (3 * MiB, (b"text" * CLUSTER_SIZE)[:CLUSTER_SIZE] + incompressible[:CLUSTER_SIZE]),
              (8 * MiB, b"\x77" * 512)]  # the short last cluster
    threads = [threading.Thread(target=writer.write, args=(data, offset)) for offset, data in writes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.zero(4 * MiB, MiB)
    writer.finish()
    writer.close()
    report = check(path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    expected = str(tmp_path / "ref.raw")
    reference(expected, size, [])
    with open(expected, "r+b") as raw:
        for offset, data in writes:
            raw.seek(offset)
            raw.write(data)
    assert qemu_img("compare", path, expected).returncode == 0
    assert report["compressed-clusters"] == 18  # the 16 of one byte, the text and the short last one
    assert report["allocated-clusters"] == 18 + 4
    # Plain: the 4 incompressible clusters; packed: 18 frames, a few bytes each, in one or two host clusters.
    assert os.path.getsize(path) < (1 + 1 + 1 + 4 + 2 + 2) * CLUSTER_SIZE + 1024


def test_a_compressed_overlay_reads_through_to_its_backing_file(tmp_path):
    reference(str(tmp_path / "base.qcow2"), 4 * MiB, ["write -P 0xaa 0 4M"], image_format="qcow2")
    path = str(tmp_path / "top.qcow2")
    writer = Qcow2Writer(path, 4 * MiB, backing="base.qcow2", backing_format="qcow2", compression_level=1)
    writer.write(b"\x55" * 2 * CLUSTER_SIZE, MiB)
    writer.zero(2 * MiB, MiB)
    writer.finish()
    writer.close()
    check(path)
    expected = reference(str(tmp_path / "expected.raw"), 4 * MiB,
                         ["write -P 0xaa 0 4M", "write -P 0x55 1M 128k", "write -z 2M 1M"])
    assert qemu_img("compare", path, expected).returncode == 0
