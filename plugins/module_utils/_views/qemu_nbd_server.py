# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""QEMU's NBD server for a backup, on a listener we made: QEMU opens no path of ours.

Over TCP, the NBD server speaks TLS with x509 credentials (verify-peer) and admits only the client
certificates whose distinguished names the start allows (an authz-list object); both objects are named
from the backup id, and the listener, the credentials and the filter go with the stop.
"""

from __future__ import annotations

import os
import socket

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import (
    SERVER_FILES,
    authz_rules,
    credential_copies,
    listen_tcp,
    read_credentials,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._views.point_in_time import probe_export_name
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpCommandError


def listen_on_unix(path, record, state):
    """Bind and listen on path ourselves, mode 0600; QEMU will get the listening socket, never the path."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError as err:
        listener.close()
        raise UserError("cannot listen on %s (%s): remove it if no backup uses it, or choose another nbd_socket"
                        % (path, err.strerror)) from None
    os.chmod(path, 0o600)  # nobody can connect before the listen below
    created = os.lstat(path)
    record["socket_identity"] = [created.st_dev, created.st_ino]
    state.save_backup(record)
    listener.listen(16)
    return listener


def listen_on_tcp(plan, record, state):
    """The TCP listener, made by us as the unix one is: QEMU gets the listening socket, and keeps it until the stop's
    nbd-server-stop closes it, so the listener lives exactly as long as the backup."""
    listener = listen_tcp(plan.tcp["host"], plan.tcp["port"])
    plan.port = listener.getsockname()[1]
    record.update(tcp=dict(host=plan.tcp["host"], port=plan.port), result=plan.result())
    state.save_backup(record)
    return listener


def add_tls(qmp, names, tcp, state):
    """QEMU's x509 credentials, checking every client's certificate against the CA (verify-peer), and the filter
    that admits only the allowed distinguished names.

    QEMU reads the credentials itself, as the user it runs as (-runas), once: when the object is made. So
    the files are copied, as we read and checked them, into a directory of ours inside the private state
    directory, as files that QEMU's user owns and alone can read; QEMU reaches them through a descriptor of
    that directory (/proc/self/fd/N), never by a path, and the copies are gone as soon as QEMU has read them.
    """
    contents = read_credentials(tcp["tls_dir"], SERVER_FILES, "nbd_tcp.tls_dir")
    with credential_copies(state.dir.path_of(names.tls_dir), contents, qmp.peer_file_uid()) as directory:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            added = qmp.execute_with_fd(fd, "add-fd", {"opaque": names.tls_fdset})
        finally:
            os.close(fd)
        try:
            qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": names.tls_creds, "endpoint": "server",
                                       "verify-peer": True, "dir": "/proc/self/fd/%d" % added["fd"]})
        finally:
            qmp.execute("remove-fd", {"fdset-id": added["fdset-id"]})
    qmp.execute("object-add", {"qom-type": "authz-list", "id": names.tls_authz, "policy": "deny",
                               "rules": authz_rules(tcp["tls_allow"])})


def start_nbd_server(qmp, names, listener, record, state, tls):
    """QEMU serves NBD on the socket we listen on: it opens no path of ours."""
    record["nbd_server_started"] = True  # before, so that a start killed right after it still stops it
    state.save_backup(record)
    qmp.execute_with_fd(listener.fileno(), "getfd", {"fdname": names.socket_fd})
    arguments = {"addr": {"type": "fd", "data": {"str": names.socket_fd}}}
    if tls:
        arguments.update({"tls-creds": names.tls_creds, "tls-authz": names.tls_authz})
    try:
        qmp.execute("nbd-server-start", arguments)
    except QmpCommandError as err:
        qmp.execute("closefd", {"fdname": names.socket_fd})
        record["nbd_server_started"] = False  # it is someone else's: ours never started
        state.save_backup(record)
        raise UserError("%s. QEMU runs only one NBD server: stop whatever else uses it first" % err) from None


def stop_nbd_server(qmp):
    try:
        qmp.execute("nbd-server-stop")
    except QmpCommandError as err:
        if "not running" not in err.desc:
            raise


def export_probe(qmp, names, index, disk):
    """The snapshot-access node of a disk, exported: it fails every read once the point-in-time view broke."""
    qmp.execute("block-export-add", {"type": "nbd", "id": names.probe_export_id(index),
                                     "node-name": names.probe_node(index),
                                     "name": probe_export_name(disk["export"]), "writable": False})
