# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Offline image operations through qemu-img, and images served alone by qemu-nbd."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError


class QemuImgError(FleetbackupError):
    """qemu-img failed; the message carries its own words."""


def run_qemu_img(*args, pass_fds=()):
    try:
        process = subprocess.run(["qemu-img"] + [str(arg) for arg in args], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False, pass_fds=pass_fds)
    except FileNotFoundError:
        raise QemuImgError("qemu-img is not installed: install qemu-utils.") from None
    return process


def checked_qemu_img(*args, pass_fds=()):
    """qemu-img's output; QemuImgError with its own words when it fails."""
    process = run_qemu_img(*args, pass_fds=pass_fds)
    if process.returncode != 0:
        raise QemuImgError("qemu-img %s failed: %s" % (args[0], process.stderr.decode(errors="replace").strip()))
    return process.stdout.decode()


def image_info(path, chain=False, pass_fds=()):
    args = ["info", "--output=json", "-U"] + (["--backing-chain"] if chain else []) + [path]
    return json.loads(checked_qemu_img(*args, pass_fds=pass_fds))


def alone(fd, image_format):
    """The image open at fd, for qemu-img and qemu-nbd, as its format says and without its backing file.

    No path is ever opened: not the image's, which could be swapped, nor the backing file's that it names.
    """
    return layered([(fd, image_format)])


def layered(images):
    """Images open at file descriptors, (fd, format) from the top down, as one chain that ends with the last: each
    is the backing of the one before, whatever file its header names, and the last has none. As alone(), no path is
    ever opened."""
    spec = None
    for fd, image_format in reversed(images):
        layer = dict(driver=image_format, file=dict(driver="file", filename="/dev/fd/%d" % fd))
        if image_format == "qcow2":
            layer["backing"] = spec
        spec = layer
    return "json:" + json.dumps(spec, sort_keys=True)


def image_bitmaps(path):
    """The names of the persistent bitmaps stored in a qcow2 image (none in other formats)."""
    specific = image_info(path).get("format-specific", {})
    return [bitmap["name"] for bitmap in specific.get("data", {}).get("bitmaps", [])]


def remove_bitmap(path, name):
    """Remove bitmap name from the image at path, where it still is."""
    if name in image_bitmaps(path):
        checked_qemu_img("bitmap", "--remove", path, name)


def images_equal(first, second):
    """True when both images have one virtual size and read the same bytes."""
    if image_info(first)["virtual-size"] != image_info(second)["virtual-size"]:
        return False
    # Not strict (-s): that would also fail on allocation, which a sparse copy may change.
    process = run_qemu_img("compare", "-U", first, second)
    if process.returncode not in (0, 1):
        raise QemuImgError("qemu-img compare failed: %s" % process.stderr.decode(errors="replace").strip())
    return process.returncode == 0


def convert_into(source, fd, target_format, size):
    """Flatten source, with its whole backing chain, into the empty file open at fd (sparse, out-of-order writes).

    qemu-img gets the file as /dev/fd/N: it never opens a path that someone could have swapped.
    """
    target = "/dev/fd/%d" % fd
    if target_format == "raw":
        os.ftruncate(fd, size)
    else:
        checked_qemu_img("create", "-q", "-f", target_format, target, size, pass_fds=(fd,))
    checked_qemu_img("convert", "-U", "-W", "-n", "-O", target_format, source, target, pass_fds=(fd,))


def image_damage(path, pass_fds=()):
    """What qemu-img check finds wrong with a qcow2 image, or None."""
    process = run_qemu_img("check", "-U", "--output=json", path, pass_fds=pass_fds)
    if process.returncode == 0:
        return None
    return (process.stdout or process.stderr).decode(errors="replace").strip()


def check_image(path):
    """qemu-img check of a qcow2 image; raises QemuImgError naming what is wrong."""
    damage = image_damage(path)
    if damage:
        raise QemuImgError("qemu-img check found %s damaged: %s" % (path, damage))


# Connections a served image allows: as many as a copy makes.
SERVED_CONNECTIONS = 4
# Seconds qemu-nbd may take to start, and to end once asked.
SERVER_TIMEOUT = 60


@contextmanager
def served(image, pass_fds=()):
    """An NBD URL of image (a path, or a spec from alone()) served read-only by a qemu-nbd of its own.

    It reports qemu:allocation-depth too. Its socket is in a new private directory; the server is ended
    by its PID when the block ends, whatever happened.
    """
    directory = tempfile.mkdtemp(prefix="fleetbackup-nbd-")  # mode 0700, ours
    try:
        socket_path = os.path.join(directory, "nbd.sock")
        pid_file = os.path.join(directory, "pid")
        try:
            # --fork returns once the socket listens; --persistent outlives the probe's connection.
            process = subprocess.run(["qemu-nbd", "--read-only", "--persistent", "--allocation-depth",
                                      "--shared=%d" % SERVED_CONNECTIONS, "--fork", "--pid-file", pid_file,
                                      "--socket", socket_path, image], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=pass_fds,
                                     timeout=SERVER_TIMEOUT, check=False)
        except FileNotFoundError:
            raise QemuImgError("qemu-nbd is not installed: install qemu-utils.") from None
        if process.returncode != 0:
            raise QemuImgError("qemu-nbd failed: %s" % process.stderr.decode(errors="replace").strip())
        with open(pid_file) as stream:
            server = os.pidfd_open(int(stream.read()))
        try:
            yield "nbd+unix:///?socket=" + socket_path
        finally:
            end_pidfd(server)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def end_pidfd(pidfd):
    """End the process of pidfd: SIGTERM, and SIGKILL if it lingers; return once it is gone."""
    try:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                return
            if select.select([pidfd], [], [], SERVER_TIMEOUT)[0]:
                return
    finally:
        os.close(pidfd)


def qcow2_full_size(size):
    """Bytes a qcow2 image of `size` virtual bytes takes once every cluster is written, metadata included."""
    return json.loads(checked_qemu_img("measure", "--output=json", "-O", "qcow2", "--size", size))["fully-allocated"]
