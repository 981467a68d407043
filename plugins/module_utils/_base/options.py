# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The argument specs of the option groups, each the spec of one doc fragment (plugins/doc_fragments/).

A group is declared here and documented in its fragment, nowhere else: a module composes its argument_spec from
the groups it extends its documentation with, plus its own options, as community.hashi_vault's modules do.
validate-modules checks that each module's spec and documentation agree; tests/unit/test_role_options.py checks
the roles' variables that pass these options on.

Pure data, so that a module's payload gains nothing else by it.
"""

from __future__ import annotations

# fleetbackup's own directory on a host; each fragment says what is kept there.
STATE_DIR = dict(type="path", default="/var/lib/fleetbackup")

# fleetbackup.qemu.vm: how a VM is reached.
VM_ARGUMENT_SPEC = dict(
    qmp_socket=dict(type="path"),
    domain=dict(type="str"),
    libvirt_uri=dict(type="str", default="qemu:///system", aliases=["uri"]),
    qemu_dir=dict(type="path", default="/var/lib/fleetbackup-qemu"),
    timeout=dict(type="float", default=10, aliases=["qmp_timeout"]),
    state_dir=STATE_DIR,
)

# fleetbackup.qemu.vm.backup_id
BACKUP_ID_ARGUMENT_SPEC = dict(backup_id=dict(type="str", required=True))

# fleetbackup.qemu.vm.copy_progress: where a copy keeps its progress.
COPY_PROGRESS_ARGUMENT_SPEC = dict(state_dir=STATE_DIR)

# fleetbackup.qemu.repository.compress: how a copy stores its images.
# Level 1: on real data it keeps nearly what level 3 does (38% against 37%) for two thirds of the CPU.
DEFAULT_COMPRESSION_LEVEL = 1
COMPRESS_ARGUMENT_SPEC = dict(compress=dict(type="str", choices=["none", "zstd"], default="none"),
                              compress_level=dict(type="int", default=DEFAULT_COMPRESSION_LEVEL))

# fleetbackup.qemu.repository.link
LINK_ARGUMENT_SPEC = dict(follow_repository_link=dict(type="bool", default=False))

# fleetbackup.qemu.repository, with the .link that every module extends it with: a VM's directory in a repository.
REPOSITORY_ARGUMENT_SPEC = dict(repository=dict(type="path", required=True), vm=dict(type="str", required=True),
                                **LINK_ARGUMENT_SPEC)

# fleetbackup.qemu.tls: the start's exports over TCP, with the server's TLS.
NBD_TCP_ARGUMENT_SPEC = dict(nbd_tcp=dict(type="dict", options=dict(
    host=dict(type="str", required=True),
    port=dict(type="int", default=0),
    tls_dir=dict(type="path"),
    tls_allow=dict(type="list", elements="str"),
    plain=dict(type="bool", default=False),
)))

# fleetbackup.qemu.tls.client: the copy's certificates for such an export.
TLS_CLIENT_ARGUMENT_SPEC = dict(tls_certificates=dict(type="path"))

# fleetbackup.qemu.start (with fleetbackup.qemu.tls): the options that define a backup, which a second start with
# the same backup id must ask for again.
START_ARGUMENT_SPEC = dict(
    disks=dict(type="list", elements="str"),
    checkpoint=dict(type="str"),
    incremental=dict(type="str"),
    fallback_to_full=dict(type="bool", default=False),
    scratch_dir=dict(type="path"),
    scratch_size=dict(type="str", default="10%"),
    nbd_socket=dict(type="path"),
    **NBD_TCP_ARGUMENT_SPEC,
    cbw_timeout=dict(type="int", default=10),
    libvirt_small_scratch=dict(type="bool", default=False),
    freeze=dict(type="str", choices=["never", "always", "auto"], default="auto"),
    guest_agent_socket=dict(type="path"),
    freeze_timeout=dict(type="float", default=10),
)

# fleetbackup.qemu.encryption: the secret of encrypted images (qcow2's LUKS), and how new ones are made.
# QEMU's own default: PBKDF2 for 2 s when a key slot is made.
DEFAULT_ITER_TIME = 2000
ENCRYPTION_ARGUMENT_SPEC = dict(encryption=dict(type="dict", options=dict(
    format=dict(type="str", choices=["luks"], default="luks"),
    secret_file=dict(type="path", no_log=False),
    secret=dict(type="str", no_log=True),
    iter_time=dict(type="int", default=DEFAULT_ITER_TIME),
), mutually_exclusive=[["secret", "secret_file"]], required_one_of=[["secret", "secret_file"]]))
