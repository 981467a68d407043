# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Encryption at rest: qcow2's own LUKS encryption, done by QEMU, with the secret handed to QEMU through a pipe.

QEMU does all the crypto (AES-256-XTS, PBKDF2 key slots): an encrypted image is one that qemu-img and QEMU open
given the secret, and nothing here encrypts a byte by hand. The secret never reaches a command line, a log or a
file: every qemu-img, qemu-io or qemu-nbd that opens an encrypted image gets a `secret` object that reads it from
a pipe of its own (file=/dev/fd/N), written and closed before the process starts, and gone with it.

One rule for opening images: image_options() adds the secret to every encrypted layer of an image spec, the image's
own and those of the backing files it opens.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import DEFAULT_ITER_TIME
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import read_regular_file, shown_paths

# The one secret object of a QEMU process: every encrypted layer uses it (one secret per chain).
SECRET_ID = "fleetbackup-key"
LUKS = "luks"
# A secret fits a pipe's buffer, so it is written whole before QEMU starts reading.
SECRET_LIMIT = 4096
# QEMU's words for a secret that opens no key slot.
WRONG_SECRET = "Invalid password, cannot unlock any keyslot"


class Encryption:
    """The secret that encrypted images are opened with, and how new ones are made (iter_time: PBKDF2 ms)."""

    def __init__(self, secret, iter_time=DEFAULT_ITER_TIME):
        self.secret = secret
        self.iter_time = iter_time

    def create_options(self):
        """qemu-img create's -o options for a new LUKS-encrypted qcow2 image. PBKDF2 with SHA-512: QEMU times its
        first rounds by the thread's CPU clock, and SHA-256's (SHA-NI) are often too quick for a coarse one to see."""
        return "encrypt.format=%s,encrypt.key-secret=%s,encrypt.iter-time=%d,encrypt.hash-alg=sha512" % (
            LUKS, SECRET_ID, self.iter_time)

    @contextmanager
    def qemu_args(self):
        """(arguments, fds) that give a QEMU process the secret object: a fresh pipe, closed when the block ends."""
        read_end, write_end = os.pipe()
        try:
            try:
                os.write(write_end, self.secret)
            finally:
                os.close(write_end)  # QEMU reads up to the end
            yield ["--object", "secret,id=%s,file=/dev/fd/%d" % (SECRET_ID, read_end)], (read_end,)
        finally:
            os.close(read_end)


class _NoEncryption:
    """No secret: QEMU processes get no secret object."""

    @contextmanager
    def qemu_args(self):
        yield [], ()


def no_encryption():
    """What stands for no encryption where a process may get a secret object."""
    return _NoEncryption()


def encryption_from(options):
    """The Encryption of a module's `encryption` option (ENCRYPTION_ARGUMENT_SPEC), or None without one."""
    if not options:
        return None
    if options.get("secret_file"):
        secret = read_regular_file(options["secret_file"], "The encryption secret_file", limit=SECRET_LIMIT)
    elif options.get("secret"):
        secret = options["secret"].encode()
    else:
        raise UserError("encryption needs its secret: give encryption.secret_file (a file of root's, 0600) or "
                        "encryption.secret (from a vaulted variable).")
    if not secret or len(secret) > SECRET_LIMIT:
        raise UserError("The encryption secret is %s: give a passphrase or key of at most %d bytes, such as the "
                        "output of `openssl rand -base64 32`." % ("empty" if not secret else "too long", SECRET_LIMIT))
    iter_time = options.get("iter_time", DEFAULT_ITER_TIME)
    if not 1 <= iter_time <= 60000:
        raise UserError("encryption.iter_time must be 1 to 60000 milliseconds.")
    return Encryption(secret, iter_time)


def image_options(spec, layers):
    """spec (a qcow2 image spec, a dict) with the secret set on each encrypted layer: layers lists, top first, whether
    each image of the chain that spec opens is encrypted. A layer opened implicitly (from the name its child
    records) gets its secret as a partial "backing" spec, which QEMU merges with what it reads from the header."""
    node = spec
    for index, encrypted in enumerate(layers):
        if encrypted:
            node["encrypt"] = dict(node.get("encrypt") or {}, format=LUKS, **{"key-secret": SECRET_ID})
        if index + 1 < len(layers):
            node = node.setdefault("backing", {})
    return spec


def needs_secret(path, encrypted, encryption):
    """UserError when an encrypted image is to be opened without a secret."""
    if encrypted and encryption is None:
        raise UserError("%s is encrypted (LUKS): give encryption with the secret its backups were made with."
                        % shown_paths(path))
