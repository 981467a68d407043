# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A stopped VM's images, served read-only by qemu-nbd: what any connection needs to stop such a backup.

A VM may start while its offline backup runs (it wins, see offline_vm), so the backup's stop may come through
the QMP or libvirt connection of the running VM: the teardown lives here, apart from OfflineVm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import (
    authz_rules,
    credential_copies_name,
    remove_credential_copies,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    file_identity,
    process_alive,
    process_start_time,
    remove_file,
    this_process,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import end_pidfd

OFFLINE = "offline"
DISKS = "disks.json"
# Hands qemu-nbd a listener as systemd's socket activation does: on descriptor 3, with LISTEN_PID its own PID
# (exec keeps it) and LISTEN_FDS 1. In Python, not sh: dash takes no descriptor above 9 in a redirection.
SOCKET_ACTIVATION = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); "
                     "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                     "os.execvp(sys.argv[2], sys.argv[2:])")


def pidfile_name(index):
    """The pid file of disk index's qemu-nbd, in the VM's private state directory."""
    return "nbd-%d.pid" % index


def image_identity(path):
    """What identifies an image file (a symlink to it is fine): [device, inode]; None when it is no regular file."""
    return file_identity(path, follow=True)


def image_fingerprint(path):
    """(inode, size, mtime, ctime): any write, metadata change or replacement of the file changes it."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def remember_disks(state, disks, vm):
    """Record a running VM's disks, and vm (its socket, name and UUID), in its private state: what a backup while it
    is stopped goes by."""
    record = dict(vm, disks=[dict(name=disk.name, node=disk.node, qdev=disk.qdev, format=disk.format,
                                  filename=disk.filename, read_only=disk.read_only,
                                  identity=image_identity(disk.filename)) for disk in disks])
    known = state.dir.read_json(DISKS)
    if known is None or {key: value for key, value in known.items() if key != "seen"} != record:
        state.dir.write_json(DISKS, dict(record, seen=int(time.time())))


def recorded_disks(state):
    """(disks, when) as fleetbackup last saw a QMP VM running; None when it never saw it."""
    record = state.dir.read_json(DISKS)
    if record is None:
        return None
    return record["disks"], record["seen"]


def servers_alive(record):
    return bool(record["servers"]) and all(process_alive(server["owner"]) for server in record["servers"])


def remove_offline_backup(connection, record, discard_checkpoint, check_mode):
    """End an offline backup, from whichever connection reaches the VM now: its qemu-nbds (by recorded PID and
    start time), their sockets, its state; with discard_checkpoint, the bitmaps it added.

    Intact when it completed, its servers still ran, and no image changed since the export began.
    """
    unrecorded = unrecorded_servers(connection.state, record)
    alive = [server for server in record["servers"] + unrecorded if process_alive(server["owner"])]
    changed = [path for path, fingerprint in record["fingerprints"].items() if image_fingerprint(path) != fingerprint]
    intact = (len(alive) == len(record["servers"]) and not changed) if record["complete"] else None
    checkpoint = record["checkpoint"] if discard_checkpoint and record["added"] else None
    # The VM may run now: its connection removes the bitmaps from QEMU, or from the images when it is stopped.
    sockets = [server["socket"] for server in record["servers"] if server["socket"]]
    removed = dict(job=False, exports=[disk["export"] for disk in record["disks"]] if alive else [], nodes=[],
                   nbd_server=bool(alive), objects=[], checkpoint=checkpoint, state_file=True,
                   files=[path for path in sockets if os.path.lexists(path)])
    if changed:
        connection.notes.append("The images %s changed during the backup (the VM was started, or something else "
                                "wrote them): the VM won, and this backup holds no single point in time."
                                % ", ".join(sorted(changed)))
    if check_mode:
        return removed, intact
    for server in alive:
        end_server(server["owner"])
    for path in removed["files"]:
        remove_file(path)
    for index in range(len(record["disks"])):
        remove_file(connection.state.dir.path_of(pidfile_name(index)))
    # A start killed while qemu-nbd loaded its credentials left their copies.
    remove_credential_copies(connection.state.dir.path_of(credential_copies_name(record["backup_id"])))
    if checkpoint:
        connection.remove_checkpoint(checkpoint, record["added"])
        connection.registry.forget(record["added"], checkpoint)
    connection.state.forget_backup()
    return removed, intact


def unrecorded_servers(state, record):
    """The qemu-nbds that a start killed after they forked, before it recorded them: found by the pid files they
    wrote in our private directory, and taken for ours only when their command line serves the disk's export."""
    found = []
    for index, disk in enumerate(record["disks"][len(record["servers"]):], start=len(record["servers"])):
        try:
            with open(state.dir.path_of(pidfile_name(index))) as stream:
                pid = int(stream.read())
            with open("/proc/%d/cmdline" % pid, "rb") as stream:
                argv = stream.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if [b"--export-name", disk["export"].encode()] in [argv[i:i + 2] for i in range(len(argv) - 1)]:
            owner = this_process()
            owner.update(pid=pid, started=process_start_time(pid))
            found.append(dict(disk=disk["disk"], socket=disk["socket"], owner=owner))
    return found


def end_server(owner):
    """End a qemu-nbd of ours, if still the process we started, and wait until it is gone (it forked away)."""
    try:
        pidfd = os.pidfd_open(owner["pid"])
    except ProcessLookupError:
        return
    if process_alive(owner):
        end_pidfd(pidfd)
    else:
        os.close(pidfd)  # its PID is another process's now


def serve_image(disk, incremental, pidfile, listener=None, tls=None):
    """A qemu-nbd serving one image read-only, without a lock, until the stop; it forks once it listens.

    It listens on the disk's unix socket, or on a TCP listener of ours, handed over as systemd's socket activation
    does (descriptor 3, LISTEN_PID, LISTEN_FDS), so a free port is known before it starts. tls: (a directory with
    the server's credentials, the distinguished names that may connect); qemu-nbd loads them before it forks.
    Returns the server's record: the disk, its socket, and who the process is (PID and start time). The pid file
    stays until the caller recorded the server: a start killed before finds the server by it (unrecorded_servers).
    """
    for leftover in (disk["socket"], pidfile):
        if leftover:
            remove_file(leftover)  # our own directory: what a dead run left
    argv = ["qemu-nbd", "--fork", "--persistent", "--read-only", "--shared=0", "--cache=none", "--aio=threads",
            "--pid-file", pidfile, "--export-name", disk["export"]]
    if listener is None:
        argv += ["--socket", disk["socket"]]
    if tls:
        directory, allowed = tls
        argv += ["--object", "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir=%s"
                 % directory.replace(",", ",,"),
                 "--object", json.dumps({"qom-type": "authz-list", "id": "authz0", "policy": "deny",
                                         "rules": authz_rules(allowed)}),
                 "--tls-creds", "tls0", "--tls-authz", "authz0"]
    if disk["mode"] == "incremental":
        argv += ["--bitmap", incremental]
    argv += ["--image-opts", "driver=%s,file.driver=file,file.filename=%s,file.locking=off"
             % (disk["format"], disk["filename"].replace(",", ",,"))]
    pass_fds = ()
    if listener is not None:
        argv = [sys.executable, "-c", SOCKET_ACTIVATION, str(listener.fileno())] + argv
        pass_fds = (listener.fileno(),)
    process = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             pass_fds=pass_fds, check=False)
    if process.returncode != 0:
        raise UserError("qemu-nbd could not serve the image %s of disk %s: %s"
                        % (disk["filename"], disk["disk"], process.stderr.decode(errors="replace").strip()))
    with open(pidfile) as stream:
        pid = int(stream.read())
    if disk["socket"]:
        os.chmod(disk["socket"], 0o600)
    owner = this_process()
    owner.update(pid=pid, started=process_start_time(pid))
    return dict(disk=disk["disk"], socket=disk["socket"], owner=owner)
