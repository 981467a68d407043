# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""qemu_backup_copy's work: its parameters checked, then a disk's export copied into a backup image, or an image
that holds it kept.

The image is written as a partial file and renamed once complete (images.py), after the point-in-time
view proved to have held through every read; the image records which backup it holds, so that a later
copy keeps it instead of copying again.
"""

from __future__ import annotations

import os
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import LUKS, encryption_from
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.fast_hash import HAS_XXHASH, missing_xxhash
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.libnbd import HAS_LIBNBD
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import missing_libnbd
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import SecretError, check_image, image_info
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.zstd import HAS_ZSTANDARD, missing_zstandard
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import export_size_and_connections
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.engine import MAX_BUFFER_BYTES, MAX_REQUEST_SIZE, copy_to_image
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.extents import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import parse_bandwidth, progress_recorded
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.qcow2_writer import CLUSTER_SIZE, check_backing_name
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import CLIENT_FILES, read_credentials, with_certificates
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.images import (
    describe_identity,
    disk_usage,
    partial_name,
    publish,
    record_identity,
    recorded_identity,
    remove_stale_partials,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.point_in_time import (
    check_view,
    export_name_of,
    export_view,
)

# zstd's levels beyond this need far more memory per thread, and gain little on disk images.
MAX_COMPRESSION_LEVEL = 19
# zstd's fast levels (zstd --fast=N) go below 1: faster still, for less gain; 0 would mean zstd's default, 3.
MIN_COMPRESSION_LEVEL = -10


def copy_or_keep(params, dest_dir, bandwidth, progress, check_mode, warn, deadline=None):
    """Copy src into dest, in dest_dir; or keep dest when it holds this very backup. Parameters checked already;
    warn(message) tells the user what they should know; deadline: as the engine's copy(). The result's kept says
    which it did."""
    dest = params["dest"]
    src = with_certificates(params["src"], params["tls_certificates"]) if params["tls_certificates"] else params["src"]
    bitmap_context = dirty_context(params["dirty_bitmap"]) if params["dirty_bitmap"] else None
    # Also in check mode: reading the export's size is harmless and proves src is right.
    size, connections = export_size_and_connections(src, bitmap_context, params["connections"])
    view = export_view(src)
    check_view(view)
    encryption = encryption_from(params.get("encryption"))
    if params["backing"]:  # every copy, not only the run's: a chain has one kind and one secret
        check_backing_encryption(params["backing"], encryption)
    identity = dict(export=export_name_of(params["src"]), size=size, bitmap=bitmap_context, format=params["format"],
                    backing=os.path.relpath(params["backing"], dest_dir) if params["backing"] else None,
                    backing_format=params["backing_format"] if params["backing"] else None,
                    encryption=LUKS if encryption else None)
    if os.path.lexists(dest) and not params["force"]:
        held = recorded_identity(dest)
        if held is None or {key: held.get(key) for key in identity} != identity:
            raise UserError("dest %s already holds %s, not this export's %s: it is another backup, or one that "
                            "cannot be identified. Choose another dest, or set force to replace it."
                            % (dest, describe_identity(held), describe_identity(identity)))
        return dict(kept=True, image=dest, disk_usage=disk_usage(dest), checksum=held.get("checksum"),
                    msg="dest holds this very backup")
    if check_mode:
        return dict(kept=False, image=dest, size=size, connections=connections)
    stale = remove_stale_partials(dest_dir)
    partial = os.path.join(dest_dir, partial_name(dest))
    started = time.monotonic()
    try:
        copied = copy_to_image(src, partial, params["format"], size, bitmap_context, identity["backing"],
                               params["backing_format"], connections, params["requests"], params["request_size"],
                               bandwidth=bandwidth, report=progress, deadline=deadline,
                               compression_level=compression_level(params), encryption=encryption)
    except FleetbackupError:
        check_view(view)  # a broken view is the likelier cause, and the one to name
        raise
    try:
        # A view that still holds now held during every read of the copy: a broken one never heals.
        check_view(view)
        if not record_identity(partial, dict(identity, checksum=copied.checksum)):
            warn("The file system of %s keeps no extended attributes: a later copy cannot prove that dest "
                 "holds this backup, and will need force." % dest_dir)
        publish(partial, dest)
    except BaseException:
        remove_file(partial)  # ours: copy_to_image made it
        raise
    elapsed = max(time.monotonic() - started, 1e-6)  # a tiny copy must not divide by zero
    return dict(kept=False, image=dest, size=size, disk_usage=disk_usage(dest), removed_partials=stale,
                bytes_read=copied.bytes_read, bytes_zeroed=copied.bytes_zeroed, bytes_unchanged=copied.bytes_clean,
                connections=connections, elapsed=round(elapsed, 3), throughput=int(copied.bytes_read / elapsed),
                checksum=copied.checksum, encryption=identity["encryption"])


def check_backing_encryption(backing, encryption):
    """UserError unless the backing image is encrypted exactly when the new overlay is to be, and encryption's secret
    opens it: a chain has one secret, and a wrong one fails here, before anything is written."""
    encrypted = bool(image_info(backing).get("encrypted"))
    if encrypted and encryption is None:
        raise UserError("backing %s is encrypted (LUKS): give encryption, with the secret of its chain." % backing)
    if encryption is not None and not encrypted:
        raise UserError("backing %s is not encrypted, and an overlay of an encrypted chain cannot build on it: start "
                        "a new chain with a full backup (no backing) to encrypt." % backing)
    if encrypted:
        try:
            check_image(backing, encryption)  # opens its key slot: QEMU names a wrong secret
        except SecretError as err:
            raise err.of(backing) from None


def check_params(params):
    dest_dir = os.path.dirname(params["dest"]) or "."
    if not os.path.isdir(dest_dir):
        raise UserError("The directory of dest %s does not exist: create it first." % params["dest"])
    if not os.access(dest_dir, os.W_OK | os.X_OK):
        raise UserError("The directory of dest %s is not writable by this user." % params["dest"])
    if not params["src"].startswith("nbd"):
        raise UserError("src '%s' is not an NBD URL: pass the url from qemu_backup_start, like "
                        "nbd+unix:///vda?socket=/var/tmp/ID.nbd." % params["src"])
    check_tls(params)
    check_compression(params["compress"], params["compress_level"], params["format"], encryption=params.get("encryption"))
    if not 1 <= params["connections"] <= 16 or not 1 <= params["requests"] <= 1024:
        raise UserError("connections must be 1 to 16 and requests 1 to 1024.")
    if not CLUSTER_SIZE <= params["request_size"] <= MAX_REQUEST_SIZE or params["request_size"] % CLUSTER_SIZE:
        raise UserError("request_size must be a multiple of %d from %d to %d (QEMU's limit)."
                        % (CLUSTER_SIZE, CLUSTER_SIZE, MAX_REQUEST_SIZE))
    buffers = params["connections"] * params["requests"] * params["request_size"]
    if buffers > MAX_BUFFER_BYTES:
        raise UserError("connections x requests x request_size = %d x %d x %d = %d bytes of read buffers, more than "
                        "the %d (1 GiB) a copy may take: lower one of them."
                        % (params["connections"], params["requests"], params["request_size"], buffers,
                           MAX_BUFFER_BYTES))
    if params["dirty_bitmap"] and not params["backing"]:
        raise UserError("An incremental copy (dirty_bitmap) needs backing: the previous backup of this disk.")
    if params.get("encryption") and params["format"] != "qcow2":
        raise UserError("encryption needs format qcow2: qcow2's LUKS encryption is what encrypts the image.")
    if params["backing"]:
        if params["format"] != "qcow2":
            raise UserError("An overlay on backing needs format qcow2.")
        if not os.path.isfile(params["backing"]):
            raise UserError("backing %s does not exist: it must be the previous backup of this disk."
                            % params["backing"])
        check_backing_name(os.path.relpath(params["backing"], dest_dir))
    return dest_dir


def check_compression(compress, level, image_format="qcow2", copies_here=True, encryption=None):
    """compress and compress_level make sense, and this host has the library that compress needs if it copies."""
    if compress == "none":
        return
    if encryption:
        raise UserError("compress=%s and encryption cannot go together: encrypted images are written by QEMU, which "
                        "stores their clusters uncompressed. Choose one of them." % compress)
    if image_format != "qcow2":
        raise UserError("compress=%s needs format qcow2: a %s image stores no compressed data." % (compress, image_format))
    if not (1 <= level <= MAX_COMPRESSION_LEVEL or MIN_COMPRESSION_LEVEL <= level <= -1):
        raise UserError("compress_level must be 1 to %d, or %d to -1 for zstd's fast levels, not %d."
                        % (MAX_COMPRESSION_LEVEL, MIN_COMPRESSION_LEVEL, level))
    if copies_here and not HAS_ZSTANDARD:
        raise UserError(missing_zstandard())


def compression_level(params):
    """The zstd level of the copy's clusters, or None to store them as they are."""
    return params["compress_level"] if params["compress"] == "zstd" else None


def check_tls(params):
    """An nbds:// src gets its client certificates; certificates go only with an nbds:// src."""
    tls = params["src"].startswith("nbds")
    if params["tls_certificates"]:
        if not tls:
            raise UserError("tls_certificates is for an nbds:// src (a start with nbd_tcp), not for %s." % params["src"])
        read_credentials(params["tls_certificates"], CLIENT_FILES, "tls_certificates")
    elif tls and "tls-certificates=" not in params["src"]:
        raise UserError("src %s is served over TLS: give tls_certificates, the directory with the fleet CA's "
                        "ca-cert.pem and this host's client-cert.pem and client-key.pem." % params["src"])


@progress_recorded
def copy_backup(module, progress):
    """Check the parameters, then copy or keep dest; a failed check, a missing library's too, is recorded."""
    if not HAS_LIBNBD:
        raise UserError(missing_libnbd())
    if not HAS_XXHASH:
        raise UserError(missing_xxhash())
    params = module.params
    bandwidth = parse_bandwidth(params["bandwidth"])
    result = copy_or_keep(params, check_params(params), bandwidth, progress, module.check_mode, module.warn)
    kept = result.pop("kept")
    if module.check_mode and not kept:
        return dict(result, changed=True)
    changed = module.set_fs_attributes_if_different(module.load_file_common_arguments(params), not kept)
    return dict(result, changed=changed or not kept)
