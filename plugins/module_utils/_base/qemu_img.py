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
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import (
    WRONG_SECRET,
    image_options,
    no_encryption,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import die_with_parent
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import shown_paths


class QemuImgError(FleetbackupError):
    """qemu-img failed; the message carries its own words."""


# QEMU's words for an encrypted image opened without its secret.
SECRET_REQUIRED = "Parameter 'encrypt.key-secret' is required"


def run_qemu_img(*args, pass_fds=(), encryption=None):
    """qemu-img's finished process; with encryption, it gets the secret object (args[0] is the subcommand)."""
    with (encryption or no_encryption()).qemu_args() as (secret_args, secret_fds):
        try:
            process = subprocess.run(["qemu-img", str(args[0])] + secret_args + [str(arg) for arg in args[1:]],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     check=False, pass_fds=tuple(pass_fds) + secret_fds)
        except FileNotFoundError:
            raise QemuImgError("qemu-img is not installed: install qemu-utils.") from None
    return process


def checked_qemu_img(*args, pass_fds=(), encryption=None):
    """qemu-img's output; QemuImgError with its own words when it fails."""
    process = run_qemu_img(*args, pass_fds=pass_fds, encryption=encryption)
    if process.returncode != 0:
        raise qemu_failure("qemu-img %s" % args[0], process.stderr)
    return process.stdout.decode()


class SecretError(UserError):
    """A wrong or missing secret for an encrypted image; of(path) names the image."""

    def __init__(self, template, image="an encrypted image"):
        self.template = template
        super().__init__(template % dict(image=image))

    def of(self, image):
        """The same error, naming image (as the user knows its path)."""
        return SecretError(self.template, shown_paths(image))


def qemu_failure(command, stderr):
    """The error for a QEMU tool that failed with stderr: a wrong or missing secret is the user's to fix."""
    words = stderr.decode(errors="replace").strip()
    said = ("%s failed: %s" % (command, words)).replace("%", "%%")
    if WRONG_SECRET in words:
        return SecretError("The encryption secret opens no key slot of %(image)s (" + said + "): give the secret "
                           "that its chain was made with.")
    if SECRET_REQUIRED in words:
        return SecretError("%(image)s is encrypted (LUKS) and no secret was given (" + said + "): give encryption, "
                           "with the secret its chain was made with.")
    return QemuImgError("%s failed: %s" % (command, words))


def image_info(path, chain=False, pass_fds=()):
    args = ["info", "--output=json", "-U"] + (["--backing-chain"] if chain else []) + [path]
    return json.loads(checked_qemu_img(*args, pass_fds=pass_fds))


def alone(fd, image_format, encrypted=False):
    """The image open at fd, for qemu-img and qemu-nbd, as its format says and without its backing file; an encrypted
    one opened with the secret.

    No path is ever opened: not the image's, which could be swapped, nor the backing file's that it names.
    """
    return layered([(fd, image_format, encrypted)])


def layered(images):
    """Images open at file descriptors, (fd, format, encrypted) from the top down, as one chain that ends with the
    last: each is the backing of the one before, whatever file its header names, and the last has none; an encrypted
    one is opened with the secret. As alone(), no path is ever opened."""
    spec = None
    for fd, image_format, encrypted in reversed(images):
        spec = _layer("/dev/fd/%d" % fd, image_format, encrypted, spec)
    return "json:" + json.dumps(spec, sort_keys=True)


def with_chain(path, encryption):
    """What opens the image at path with its backing chain: the path itself, or with encryption a spec that gives each
    encrypted layer of the chain the secret."""
    if encryption is None:
        return path
    layers = image_info(path, chain=True)
    spec = dict(driver=layers[0]["format"], file=dict(driver="file", filename=os.path.abspath(path)))
    return "json:" + json.dumps(image_options(spec, [bool(layer.get("encrypted")) for layer in layers]),
                                sort_keys=True)


def image_bitmaps(path):
    """The names of the persistent bitmaps stored in a qcow2 image (none in other formats)."""
    specific = image_info(path).get("format-specific", {})
    return [bitmap["name"] for bitmap in specific.get("data", {}).get("bitmaps", [])]


def remove_bitmap(path, name):
    """Remove bitmap name from the image at path, where it still is."""
    if name in image_bitmaps(path):
        checked_qemu_img("bitmap", "--remove", path, name)


def explicit_chain(path):
    """The image at path with its whole backing chain as one explicit, read-only blockdev spec (a dict), each encrypted
    layer with the secret: QEMU's -blockdev takes no partial backing spec to merge with an image's header."""
    spec = None
    for layer in reversed(image_info(path, chain=True)):
        node = {"driver": layer["format"], "read-only": True,
                "file": dict(driver="file", filename=layer["filename"])}
        if layer["format"] == "qcow2":
            node["backing"] = spec
        spec = image_options(node, [bool(layer.get("encrypted"))])
    return spec


def chain_is_encrypted(path):
    """Whether any image of the chain whose top is at path is encrypted."""
    return any(layer.get("encrypted") for layer in image_info(path, chain=True))


def images_equal(first, second, encryption=None):
    """True when both images (paths, with their chains) have one virtual size and read the same bytes; encryption
    opens those that are encrypted."""
    if image_info(first)["virtual-size"] != image_info(second)["virtual-size"]:
        return False
    # Not strict (-s): that would also fail on allocation, which a sparse copy may change.
    process = run_qemu_img("compare", "-U", with_chain(first, encryption), with_chain(second, encryption),
                           encryption=encryption)
    if process.returncode not in (0, 1):
        raise qemu_failure("qemu-img compare", process.stderr)
    return process.returncode == 0


def convert_into(source, fd, target_format, size, encryption=None):
    """Flatten source, with its whole backing chain (opened with encryption's secret), into the empty file open at fd
    (sparse, out-of-order writes); what it writes is plain.

    qemu-img gets the file as /dev/fd/N: it never opens a path that someone could have swapped.
    """
    target = "/dev/fd/%d" % fd
    if target_format == "raw":
        os.ftruncate(fd, size)
    else:
        checked_qemu_img("create", "-q", "-f", target_format, target, size, pass_fds=(fd,))
    checked_qemu_img("convert", "-U", "-W", "-n", "-O", target_format, with_chain(source, encryption), target,
                     pass_fds=(fd,), encryption=encryption)


def image_damage(path, pass_fds=(), encryption=None):
    """What qemu-img check finds wrong with a qcow2 image, or None; a wrong or missing secret raises UserError."""
    process = run_qemu_img("check", "-U", "--output=json", path, pass_fds=pass_fds, encryption=encryption)
    if process.returncode == 0:
        return None
    failure = qemu_failure("qemu-img check", process.stderr)
    if isinstance(failure, UserError):
        raise failure
    return (process.stdout or process.stderr).decode(errors="replace").strip()


def check_image(path, encryption=None):
    """qemu-img check of a qcow2 image (its own layer: check reads no backing file); raises QemuImgError naming what
    is wrong."""
    damage = image_damage(alone_path(path, encryption), encryption=encryption)
    if damage:
        raise QemuImgError("qemu-img check found %s damaged: %s" % (path, damage))


def alone_path(path, encryption):
    """The image at path as check opens it: the path, or with encryption a spec with the secret if it is encrypted."""
    if encryption is None or not image_info(path).get("encrypted"):
        return path
    return "json:" + json.dumps(_layer(os.path.abspath(path), "qcow2", True, None), sort_keys=True)


def _layer(filename, image_format, encrypted, backing):
    """One image's spec, its backing spec (None: no backing file) below it."""
    spec = image_options(dict(driver=image_format, file=dict(driver="file", filename=filename)), [encrypted])
    if image_format == "qcow2":
        spec["backing"] = backing
    return spec


# Connections a served image allows: as many as a copy makes.
SERVED_CONNECTIONS = 4
# Seconds qemu-nbd may take to start, and to end once asked.
SERVER_TIMEOUT = 60
# How often a starting qemu-nbd is looked at: it tells no one when it listens.
START_POLL = 0.01


@contextmanager
def served(image, pass_fds=(), encryption=None, writable=False):
    """An NBD URL of image (a path, or a spec from alone()) served by a qemu-nbd of its own: read-only, or writable
    for a copy to write into; encryption gives it the secret object.

    It reports qemu:allocation-depth too. Its socket is in a new private directory. The server is a child that dies
    with this process's thread (PR_SET_PDEATHSIG), even when that is killed; it is ended by its PID when the block
    ends, whatever happened (it flushes what was written before it ends).
    """
    directory = tempfile.mkdtemp(prefix="fleetbackup-nbd-")  # mode 0700, ours
    try:
        socket_path = os.path.join(directory, "nbd.sock")
        with open(os.path.join(directory, "stderr"), "w+b") as errors:
            with (encryption or no_encryption()).qemu_args() as (secret_args, secret_fds):
                try:
                    process = subprocess.Popen(  # pylint: disable=consider-using-with
                        ["qemu-nbd"] + ([] if writable else ["--read-only"]) + secret_args +
                        ["--persistent", "--allocation-depth", "--shared=%d" % SERVED_CONNECTIONS,
                         "--socket", socket_path, image], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=errors, pass_fds=tuple(pass_fds) + secret_fds, preexec_fn=die_with_parent)
                except FileNotFoundError:
                    raise QemuImgError("qemu-nbd is not installed: install qemu-utils.") from None
            server = os.pidfd_open(process.pid)
            try:
                _wait_until_listening(process, socket_path, errors)
                yield "nbd+unix:///?socket=" + socket_path
            finally:
                end_pidfd(server)
                process.poll()  # reaps it; never waits on one that a hung disk keeps
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _wait_until_listening(process, socket_path, errors):
    """Return once qemu-nbd accepts connections on socket_path; its own words if it exits first."""
    deadline = time.monotonic() + SERVER_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors.seek(0)
            raise qemu_failure("qemu-nbd", errors.read())
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(socket_path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(START_POLL)
        finally:
            probe.close()
    raise QemuImgError("qemu-nbd did not listen on %s within %d s." % (socket_path, SERVER_TIMEOUT))


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
