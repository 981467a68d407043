# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # Encryption at rest (its spec: ENCRYPTION_ARGUMENT_SPEC in module_utils/_base/options.py).
    DOCUMENTATION = r"""
options:
  encryption:
    description:
      - Encryption at rest with qcow2's own LUKS encryption (C(encrypt.format=luks), AES-256-XTS with plain64 IVs and
        PBKDF2-SHA512 key slots, made by C(qemu-img create)). QEMU does all the crypto, so qemu-img, qemu-nbd
        and QEMU open the images given the secret, for example
        C(qemu-img info --object secret,id=k,file=KEYFILE --image-opts driver=qcow2,file.filename=IMAGE,encrypt.key-secret=k).
      - The secret never appears on a command line or in a log. Each QEMU process gets it as a C(secret) object that
        reads it from a pipe of its own (C(file=/dev/fd/N)), never from a file of ours.
      - A backup copy makes encrypted images; a restore, a verify and a drill open them with the secret (a restore
        writes a plain image, the VM's disk). An encrypted image without a secret, or with a wrong one, fails with
        a clear error before anything is written.
      - A chain has one secret, and is all encrypted or all plain. An incremental is written only over an encrypted
        backing image that the secret opens, never over a plain one, and a plain incremental never over an
        encrypted one. M(fleetbackup.qemu.qemu_backup) checks the secret against the chain it continues before it
        takes the lease or touches the VM. With O(fleetbackup.qemu.qemu_backup#module:level=auto) it starts a new,
        encrypted chain with a full backup when encryption is turned on; an encrypted chain is never continued
        without the secret, since a run that forgot it must not write plain backups unasked (level C(full) starts a
        plain chain).
    type: dict
    suboptions:
      format:
        description: The encryption format; qcow2's LUKS is the only one.
        type: str
        choices: [luks]
        default: luks
      secret_file:
        description:
          - A file with the secret (a passphrase or a key), on the host that runs the module. Its whole content is
            the secret, a trailing newline included, as QEMU's own C(secret,file=) reads it. At most 4096 bytes.
          - Keep it root's and mode 0600; it is read without following links.
          - Exactly one of O(encryption.secret_file) and O(encryption.secret).
        type: path
      secret:
        description:
          - The secret itself, such as a vaulted variable. It is never logged.
          - Exactly one of O(encryption.secret_file) and O(encryption.secret).
        type: str
      iter_time:
        description:
          - Milliseconds of PBKDF2 that opening a new image's key slot takes (QEMU's C(encrypt.iter-time)); only
            new images use it.
          - Every process that opens an image pays it, once per encrypted image of the chain it opens, so a restore
            of a long chain pays it per image. With a long random secret (C(openssl rand -base64 32)) a small value
            such as C(10) loses nothing; a passphrase a person chose needs the default.
        type: int
        default: 2000
"""
