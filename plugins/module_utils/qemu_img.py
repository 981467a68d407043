# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline image operations through qemu-img."""

from __future__ import annotations

import json
import os
import subprocess

from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import FleetbackupError


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


def image_info(path, chain=False):
    args = ["info", "--output=json", "-U"] + (["--backing-chain"] if chain else []) + [path]
    return json.loads(checked_qemu_img(*args))


def image_bitmaps(path):
    """The names of the persistent bitmaps stored in a qcow2 image (none in other formats)."""
    specific = image_info(path).get("format-specific", {})
    return [bitmap["name"] for bitmap in specific.get("data", {}).get("bitmaps", [])]


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


def check_image(path):
    """qemu-img check of a qcow2 image; raises QemuImgError naming what is wrong."""
    process = run_qemu_img("check", "-U", "--output=json", path)
    if process.returncode != 0:
        raise QemuImgError("qemu-img check found %s damaged: %s" % (
            path, (process.stdout or process.stderr).decode(errors="replace").strip()))


def qcow2_full_size(size):
    """Bytes a qcow2 image of `size` virtual bytes takes once every cluster is written, metadata included."""
    return json.loads(checked_qemu_img("measure", "--output=json", "-O", "qcow2", "--size", size))["fully-allocated"]
