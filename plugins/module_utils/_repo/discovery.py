# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""The VMs of one hypervisor, running or stopped, each with a name for its repository directory that no other VM
of the fleet gets: by its UUID where it has one, else by its name and its hypervisor's."""

from __future__ import annotations

import glob
import os
import re

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.offline.seen_disks import DISKS
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir, is_plain_name
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.client import QmpClient, QmpError, QmpUnreachable
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.qmp.identity import qmp_vm_identity
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import RepositoryRoot

UNSAFE = re.compile(r"[^A-Za-z0-9_.:+-]")
QMP_KEY_PREFIX = "qmp-"


def qmp_identity(socket_path, timeout):
    """(name, uuid) that a running QEMU reports; UUID None when it has none (no -uuid)."""
    with QmpClient(socket_path, timeout) as client:
        return qmp_vm_identity(client, socket_path)


def repository_name(name, uuid, hypervisor):
    """(directory name, identity): <name>.<uuid8> for a VM with a UUID, else <name>@<hypervisor>."""
    safe = UNSAFE.sub("_", name).lstrip(".") or "vm"
    if uuid:
        return "%s.%s" % (safe, uuid.replace("-", "")[:8]), "uuid"
    return "%s@%s" % (safe, UNSAFE.sub("_", hypervisor)), "hypervisor"


def vm_entry(name, uuid, hypervisor, running, connection, found_by):
    directory, identity = repository_name(name, uuid, hypervisor)
    return dict(name=name, uuid=uuid, repository_name=directory, identity=identity, running=running,
                connection=connection, found_by=found_by)


def running_qmp_vms(patterns, hypervisor, timeout, problems):
    vms, sockets = [], set()
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if os.path.realpath(path) in sockets:
                continue
            try:
                name, uuid = qmp_identity(path, timeout)
            except QmpUnreachable:
                continue  # a socket its QEMU left behind; a VM seen running before is found in the state
            except QmpError as err:
                problems.append("QMP socket %s: %s" % (path, err))
                continue
            sockets.add(os.path.realpath(path))
            vms.append(vm_entry(name, uuid, hypervisor, True, dict(qmp_socket=path), "qmp_socket"))
    return vms, sockets


def stopped_qmp_vms(state_dir, hypervisor, running_sockets, timeout):
    """The QMP VMs fleetbackup saw running, whose socket no QEMU serves now."""
    vms = []
    root = PrivateDir(os.path.join(state_dir, "vms")).check()
    if not os.path.isdir(root.path):
        return vms
    for key in sorted(os.listdir(root.path)):
        if not key.startswith(QMP_KEY_PREFIX) or not is_plain_name(key):
            continue
        record = PrivateDir(root.path_of(key)).check().read_json(DISKS)
        if not record or not record.get("qmp_socket") or os.path.realpath(record["qmp_socket"]) in running_sockets:
            continue
        try:
            qmp_identity(record["qmp_socket"], timeout)
            continue  # running, but on a socket outside the patterns: not one of this fleet's
        except QmpUnreachable:
            pass
        except QmpError:
            continue
        vms.append(vm_entry(record["name"], record["uuid"], hypervisor, False,
                            dict(qmp_socket=record["qmp_socket"]), "state"))
    return vms


def libvirt_vms(uri, hypervisor):
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.libvirt.calls import HAS_LIBVIRT, connect
    if not HAS_LIBVIRT:
        raise UserError("libvirt_uri needs libvirt's Python bindings: apt install python3-libvirt, with an "
                        "interpreter that sees Debian's packages.")
    connection = connect(uri)
    try:
        return [vm_entry(domain.name(), domain.UUIDString(), hypervisor, bool(domain.isActive()),
                         dict(domain=domain.UUIDString(), libvirt_uri=uri), "libvirt")
                for domain in sorted(connection.listAllDomains(0), key=lambda d: d.name())]
    finally:
        connection.close()


def discover(qmp_sockets, libvirt_uri, state_dir, hypervisor, repository, timeout, follow_repository_link=False):
    problems = []
    vms, running_sockets = running_qmp_vms(qmp_sockets, hypervisor, timeout, problems)
    vms += stopped_qmp_vms(state_dir, hypervisor, running_sockets, timeout)
    if libvirt_uri:
        vms += libvirt_vms(libvirt_uri, hypervisor)
    names = [vm["repository_name"] for vm in vms]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError("Two VMs of this hypervisor would share the repository directory %s (the same name and "
                        "UUID): give them distinct -name or -uuid." % ", ".join(twice))
    missing = []
    if repository and os.path.lexists(repository):
        missing = [name for name in RepositoryRoot(repository, follow_repository_link).vm_names() if name not in names]
    return dict(vms=vms, problems=problems, missing=missing)


def choose_fleet_vms(hypervisors):
    """One entry per repository directory across the fleet, from each hypervisor's discovery.

    A VM that moved is still listed as stopped where it ran before (from that hypervisor's state): the hypervisor
    where it runs wins. Two running, or only stopped ones on several hypervisors, cannot be told apart: the entry
    carries a conflict, and that VM is not backed up. hypervisors: the hypervisors' variables (inventory_hostname,
    qemu_hypervisor_state_dir, fleetbackup_found).
    """
    listed = {}
    for host in hypervisors:
        for vm in host["fleetbackup_found"]["vms"]:
            listed.setdefault(vm["repository_name"], []).append((host, vm))
    chosen = []
    for name, entries in listed.items():
        candidates = [entry for entry in entries if entry[1]["running"]] or entries
        host, vm = candidates[0]
        conflict = ""
        if len(candidates) > 1:
            conflict = ("%s is %s on %s, and which of them is the VM cannot be told: remove or rename the others "
                        "(another name or UUID), or start the one to back up and stop the others."
                        % (name, "running" if vm["running"] else "stopped",
                           " and ".join(entry[0]["inventory_hostname"] for entry in candidates)))
        chosen.append(dict(hypervisor=host["inventory_hostname"], state_dir=host["qemu_hypervisor_state_dir"], vm=vm,
                           conflict=conflict))
    return chosen
