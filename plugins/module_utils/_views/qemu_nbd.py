# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""qemu-nbd serving one image of a stopped VM read-only, started as ours and ended by its recorded PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import remove_file
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import (
    process_alive,
    process_start_time,
    this_process,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import end_pidfd
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.tls import authz_rules

# Hands qemu-nbd a listener as systemd's socket activation does: on descriptor 3, with LISTEN_PID its own PID
# (exec keeps it) and LISTEN_FDS 1. In Python, not sh: dash takes no descriptor above 9 in a redirection.
SOCKET_ACTIVATION = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd == 3 or os.close(fd); "
                     "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
                     "os.execvp(sys.argv[2], sys.argv[2:])")


def pidfile_name(index):
    """The pid file of disk index's qemu-nbd, in the VM's private state directory."""
    return "nbd-%d.pid" % index


def servers_alive(record):
    return bool(record["servers"]) and all(process_alive(server["owner"]) for server in record["servers"])


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
