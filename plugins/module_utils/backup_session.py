# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A pull-mode backup inside a running QEMU: its names, its start and its teardown.

Every object is named from the backup id, and a state file in scratch_dir
records what a start has created, so a stop (or a start's rollback) finds all
of it again, even after the start or a copy was killed half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from urllib.parse import quote

from ansible_collections.fleetbackup.qemu.plugins.module_utils.checkpoints import checkpoint_problem
from ansible_collections.fleetbackup.qemu.plugins.module_utils.errors import FleetbackupError, UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.nbd_copy import dirty_context
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qemu_img import create_image
from ansible_collections.fleetbackup.qemu.plugins.module_utils.qmp_client import QmpCommandError
from ansible_collections.fleetbackup.qemu.plugins.module_utils.vm_disks import list_disks, node_bitmaps, select_disks

BACKUP_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
EXPORT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def check_backup_id(backup_id):
    if not BACKUP_ID_PATTERN.match(backup_id or ""):
        raise UserError("Invalid backup_id '%s': use 1 to 32 letters, digits, '_' or '-'." % backup_id)


def backup_names(params):
    """The names of the backup that module params (backup_id, scratch_dir) describe, once the id is valid."""
    check_backup_id(params["backup_id"])
    return BackupNames(params["backup_id"], params["scratch_dir"])


def check_scratch_dir(scratch_dir):
    if not os.path.isdir(scratch_dir):
        raise UserError("scratch_dir %s does not exist: create it, or point scratch_dir at a directory with "
                        "room for what the guest writes during the backup." % scratch_dir)
    try:
        # A real write also catches read-only mounts, which os.access misses for root.
        tempfile.TemporaryFile(dir=scratch_dir).close()
    except OSError as err:
        raise UserError("scratch_dir %s is not writable (%s): fix its permissions or choose another."
                        % (scratch_dir, err.strerror)) from None


class BackupNames:
    """Every name a backup uses, derived from its id."""

    def __init__(self, backup_id, scratch_dir):
        self.backup_id = backup_id
        self.scratch_dir = scratch_dir
        # QEMU node names are limited to 31 characters, so nodes carry a digest of the id.
        self._node_prefix = "fb" + hashlib.sha1(backup_id.encode()).hexdigest()[:12]
        self._numbered = re.compile(r"^fb-%s-(\d+)$" % re.escape(backup_id))
        self.temp_bitmap = "fb-%s" % backup_id
        self.state_file = os.path.join(scratch_dir, "%s.fleetbackup.json" % backup_id)
        self.default_socket = os.path.join(scratch_dir, "%s.nbd" % backup_id)

    def job(self, index):
        return "fb-%s-%d" % (self.backup_id, index)

    export_id = job

    def scratch_node(self, index):
        return "%s-s%d" % (self._node_prefix, index)

    def filter_node(self, index):
        return "%s-f%d" % (self._node_prefix, index)

    def scratch_file(self, export):
        return os.path.join(self.scratch_dir, "%s.%s.scratch.qcow2" % (self.backup_id, export))

    def owns(self, qemu_id):
        """True for a job or export id that this backup created."""
        return bool(self._numbered.match(qemu_id or ""))

    def owns_node(self, node_name):
        return bool(re.match(r"^%s-[sf]\d+$" % self._node_prefix, node_name or ""))


def export_names(disks):
    """A unique NBD export name per disk, safe in a URL."""
    names = []
    for disk in disks:
        name = EXPORT_NAME_UNSAFE.sub("_", disk.name)
        names.append(name if name not in names else "%s_%d" % (name, len(names)))
    return names


def nbd_url(export, socket_path):
    return "nbd+unix:///%s?socket=%s" % (quote(export), quote(socket_path, safe="/"))


class BackupState:
    """The state file: what a start created, written before QEMU is asked to create it."""

    def __init__(self, path, data=None):
        self.path = path
        self.data = data or {}

    @classmethod
    def load(cls, path):
        try:
            with open(path) as stream:
                return cls(path, json.load(stream))
        except FileNotFoundError:
            return None
        except ValueError as err:
            raise UserError("Backup state file %s is unreadable (%s): remove it after checking that no "
                            "backup with this id runs." % (path, err)) from None

    def save(self):
        temporary = self.path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as stream:
            json.dump(self.data, stream, indent=1, sort_keys=True)
        os.replace(temporary, self.path)

    def remove(self):
        for path in (self.path, self.path + ".tmp"):
            _unlink(path)


def _unlink(path):
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class BackupPlan:
    """What a start will do, decided from QMP queries before anything is created."""

    def __init__(self, names, disks, nbd_socket, registry, checkpoint=None, incremental=None,
                 fallback_to_full=False):
        self.names = names
        self.registry = registry
        self.nbd_socket = nbd_socket
        self.checkpoint = checkpoint
        self.incremental = incremental
        self.chosen = disks
        self.disks = []
        for index, (disk, export) in enumerate(zip(disks, export_names(disks))):
            mode, reason = _disk_mode(disk, incremental, fallback_to_full, registry)
            _check_checkpoint_target(disk, checkpoint)
            self.disks.append(dict(
                disk=disk.name, node=disk.node, format=disk.format, filename=disk.filename, export=export,
                url=nbd_url(export, nbd_socket), size=disk.size, mode=mode,
                dirty_bitmap=dirty_context(names.temp_bitmap) if mode == "incremental" else None,
                dirty_bytes=disk.bitmaps[incremental]["count"] if mode == "incremental" else None,
                granularity=disk.bitmaps[incremental]["granularity"] if mode == "incremental" else None,
                reason=reason, job=names.job(index), export_id=names.export_id(index),
                scratch_node=names.scratch_node(index), filter_node=names.filter_node(index),
                scratch_file=names.scratch_file(export)))

    def result(self):
        public = ("disk", "node", "export", "url", "size", "mode", "dirty_bitmap", "dirty_bytes", "reason")
        return dict(id=self.names.backup_id, nbd_socket=self.nbd_socket, checkpoint=self.checkpoint,
                    incremental=self.incremental,
                    disks=[{key: disk[key] for key in public} for disk in self.disks])

    def transaction_actions(self):
        """All disks freeze in one transaction: one point in time for the whole VM."""
        actions = []
        for disk in self.disks:
            if disk["mode"] == "incremental":
                # The exported bitmap is a frozen copy taken in the same instant as the fleecing.
                actions.append(("block-dirty-bitmap-add", dict(
                    node=disk["node"], name=self.names.temp_bitmap, granularity=disk["granularity"],
                    persistent=False, disabled=True)))
                actions.append(("block-dirty-bitmap-merge", dict(
                    node=disk["node"], target=self.names.temp_bitmap, bitmaps=[self.incremental])))
            if self.checkpoint:
                actions.append(("block-dirty-bitmap-add", dict(
                    node=disk["node"], name=self.checkpoint, persistent=True)))
            # blockdev-backup sync=none inserts its own copy-before-write filter into the live graph;
            # QEMU 7.2 cannot insert a user-made copy-before-write node above a device in use.
            actions.append(("blockdev-backup", {
                "job-id": disk["job"], "device": disk["node"], "target": disk["scratch_node"],
                "sync": "none", "filter-node-name": disk["filter_node"]}))
        return actions


def _disk_mode(disk, incremental, fallback_to_full, registry):
    """('full' | 'incremental', reason for a full backup where an incremental was asked)."""
    if not incremental:
        return "full", None
    problem = checkpoint_problem(disk, incremental, registry)
    if problem is None:
        return "incremental", None
    if fallback_to_full:
        return "full", problem
    raise UserError("Cannot back up incrementally: %s. Take a full backup, or set fallback_to_full: true."
                    % problem)


def _check_checkpoint_target(disk, checkpoint):
    if not checkpoint:
        return
    if disk.format != "qcow2":
        raise UserError("Cannot add checkpoint '%s' to disk %s: it is %s, and persistent dirty bitmaps need "
                        "qcow2. Leave out the checkpoint, or back up only the qcow2 disks." %
                        (checkpoint, disk.name, disk.format))
    if checkpoint in disk.bitmaps:
        raise UserError("Checkpoint '%s' already exists on disk %s: name the new checkpoint differently, or "
                        "remove the old one with fleetbackup.qemu.qemu_checkpoint state=absent."
                        % (checkpoint, disk.name))


def running_backup(qmp, names):
    """The result of this backup if it runs completely; raises UserError if it is half there."""
    state = BackupState.load(names.state_file)
    leftovers = find_leftovers(qmp, names, node_bitmaps(qmp))
    if state is None and not any(leftovers.values()):
        return None
    if state is not None and state.data.get("complete"):
        exports = set(leftovers["exports"])
        if all(disk["export_id"] in exports for disk in state.data["disks"]):
            return state
    raise UserError("Backup '%s' is only partly set up (a start was interrupted, or QEMU restarted since): "
                    "run fleetbackup.qemu.qemu_backup_stop with backup_id %s and the same scratch_dir, "
                    "then start again." % (names.backup_id, names.backup_id))


def start_backup(qmp, names, plan, check_mode):
    """Create the backup of `plan`; on any failure roll back everything it created."""
    if check_mode:
        return plan.result()
    state = BackupState(names.state_file, dict(
        backup_id=names.backup_id, complete=False, qmp_socket=qmp.socket_path, nbd_socket=plan.nbd_socket,
        nbd_server_started=False, checkpoint=plan.checkpoint, disks=plan.disks, result=plan.result()))
    state.save()
    try:
        _create(qmp, plan, state)
    except Exception as err:  # pylint: disable=broad-except
        step = getattr(err, "step", None)
        try:
            stop_backup(qmp, names, plan.registry, discard_checkpoint=True)
        except (FleetbackupError, OSError) as cleanup_error:
            raise UserError("Starting backup '%s' failed%s: %s. Cleaning up failed too: %s" % (
                names.backup_id, " at " + step if step else "", err, cleanup_error)) from None
        if step is None:
            raise
        raise UserError("Starting backup '%s' failed at %s: %s. Everything it had created was removed."
                        % (names.backup_id, step, err)) from None
    return _finish(qmp, plan, state)


class _StepError(Exception):
    def __init__(self, step, cause):
        super().__init__(str(cause))
        self.step = step


def _step(name, action, *args):
    try:
        return action(*args)
    except (FleetbackupError, OSError) as err:
        raise _StepError(name, err) from None


def _create(qmp, plan, state):
    for disk in plan.disks:
        _step("creating scratch image %s" % disk["scratch_file"], create_image,
              disk["scratch_file"], "qcow2", disk["size"])
        _step("adding scratch node for disk %s" % disk["disk"], qmp.execute, "blockdev-add", {
            "driver": "qcow2", "node-name": disk["scratch_node"], "discard": "unmap",
            "file": {"driver": "file", "filename": disk["scratch_file"]}, "backing": disk["node"]})
    _step("the backup transaction", qmp.transaction, plan.transaction_actions())
    if plan.checkpoint:
        plan.registry.record(plan.chosen, plan.checkpoint)
    _start_nbd_server(qmp, plan, state)
    for disk in plan.disks:
        export = {"type": "nbd", "id": disk["export_id"], "node-name": disk["scratch_node"],
                  "name": disk["export"], "writable": False, "allocation-depth": True}
        if disk["mode"] == "incremental":
            export["bitmaps"] = [{"node": disk["node"], "name": plan.names.temp_bitmap}]
        _step("exporting disk %s over NBD" % disk["disk"], qmp.execute, "block-export-add", export)


def _start_nbd_server(qmp, plan, state):
    if os.path.exists(plan.nbd_socket):
        raise _StepError("starting the NBD server", "%s already exists; remove it if no backup uses it, or "
                         "choose another nbd_socket" % plan.nbd_socket)
    try:
        qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": plan.nbd_socket}}})
    except QmpCommandError as err:
        raise _StepError("starting the NBD server", "%s. QEMU runs only one NBD server: stop the other backup "
                         "of this VM first" % err) from None
    state.data["nbd_server_started"] = True
    state.save()
    os.chmod(plan.nbd_socket, 0o600)


def _finish(qmp, plan, state):
    """Mark the backup complete, with the dirty counts of the frozen bitmaps."""
    bitmaps = node_bitmaps(qmp)
    for disk in plan.disks:
        if disk["mode"] == "incremental":
            disk["dirty_bytes"] = bitmaps[disk["node"]][plan.names.temp_bitmap]["count"]
    state.data.update(complete=True, disks=plan.disks, result=plan.result())
    state.save()
    return state.data["result"]


def find_leftovers(qmp, names, bitmaps):
    """Every export, job, node and temporary bitmap in QEMU that carries this backup's names.

    bitmaps: node_bitmaps(), which callers also need for other questions.
    """
    return dict(
        exports=[e["id"] for e in qmp.execute("query-block-exports") if names.owns(e["id"])],
        jobs=[j for j in qmp.execute("query-block-jobs") if names.owns(j["device"])],
        nodes=[node for node in bitmaps if names.owns_node(node)],
        bitmap_nodes=[node for node, named in bitmaps.items() if names.temp_bitmap in named],
    )


RUNNING_ID = re.compile(r"^fb-([A-Za-z0-9_-]{1,32})-\d+$")


def running_backups(qmp):
    """{backup_id: {exports, jobs}} of the backups running in this QEMU, from their names."""
    backups = {}
    for export in qmp.execute("query-block-exports"):
        match = RUNNING_ID.match(export["id"])
        if match:
            backups.setdefault(match.group(1), dict(exports=[], jobs=[]))["exports"].append(export["id"])
    for job in qmp.execute("query-block-jobs"):
        match = RUNNING_ID.match(job["device"])
        if match:
            backups.setdefault(match.group(1), dict(exports=[], jobs=[]))["jobs"].append(job["device"])
    return backups


def stop_backup(qmp, names, registry, discard_checkpoint=False, check_mode=False):
    """Remove everything the backup created, in QEMU and on disk.

    Returns what was (or would be) removed, and whether the point-in-time view was still intact: every job of a
    complete start still running. A job that ended early (its scratch image ran out of room, say) stopped
    preserving old data, so what was copied since may mix two points in time; None when there was no backup.
    """
    state = BackupState.load(names.state_file)
    data = state.data if state else {}
    bitmaps = node_bitmaps(qmp)
    leftovers = find_leftovers(qmp, names, bitmaps)
    files = [d["scratch_file"] for d in data.get("disks", []) if os.path.exists(d["scratch_file"])]
    if data.get("nbd_server_started") and os.path.exists(data["nbd_socket"]):
        files.append(data["nbd_socket"])
    checkpoint_nodes = _checkpoint_nodes(bitmaps, data) if discard_checkpoint else []
    running = {job["device"] for job in leftovers["jobs"] if job.get("status") == "running"}
    intact = all(disk["job"] in running for disk in data["disks"]) if data.get("complete") else None
    removed = dict(exports=leftovers["exports"], jobs=[j["device"] for j in leftovers["jobs"]],
                   nodes=[n for n in leftovers["nodes"] if not re.search(r"-f\d+$", n)],
                   files=files, nbd_server=bool(data.get("nbd_server_started")),
                   checkpoint=data.get("checkpoint") if checkpoint_nodes else None,
                   state_file=state is not None)
    if check_mode:
        return removed, intact
    for export_id in leftovers["exports"]:
        qmp.execute("block-export-del", {"id": export_id, "mode": "hard"})
        qmp.wait_event("BLOCK_EXPORT_DELETED", id=export_id)
    if data.get("nbd_server_started"):
        _stop_nbd_server(qmp)
    for job in leftovers["jobs"]:
        qmp.execute("block-job-cancel", {"device": job["device"], "force": True})
        qmp.wait_event(("BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"), device=job["device"])
    for node in removed["nodes"]:
        qmp.execute("blockdev-del", {"node-name": node})
    for node in leftovers["bitmap_nodes"]:
        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": names.temp_bitmap})
    for node in checkpoint_nodes:
        qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": data["checkpoint"]})
    if checkpoint_nodes:
        registry.forget([d["filename"] for d in data["disks"] if d["node"] in checkpoint_nodes], data["checkpoint"])
    for path in files:
        _unlink(path)
    if state:
        state.remove()
    return removed, intact


def stop_dead_backup(names, qmp_socket, registry, discard_checkpoint=False, check_mode=False):
    """Remove the files of a backup whose QEMU is gone (its objects went with the process).

    Only when the state file names this very QMP socket, so a mistyped path never deletes a live backup's files.
    Returns what was removed, or None when the backup is not known to belong to that socket.
    """
    state = BackupState.load(names.state_file)
    if state is None or state.data.get("qmp_socket") != qmp_socket:
        return None
    data = state.data
    files = [d["scratch_file"] for d in data["disks"] if os.path.exists(d["scratch_file"])]
    if os.path.exists(data["nbd_socket"]):
        files.append(data["nbd_socket"])
    checkpoint = data.get("checkpoint") if discard_checkpoint else None
    if not check_mode:
        for path in files:
            _unlink(path)
        if checkpoint:
            registry.forget([d["filename"] for d in data["disks"]], checkpoint)
        state.remove()
    return dict(exports=[], jobs=[], nodes=[], files=files, nbd_server=False, checkpoint=checkpoint,
                state_file=True)


def _stop_nbd_server(qmp):
    try:
        qmp.execute("nbd-server-stop")
    except QmpCommandError as err:
        if "not running" not in err.desc:
            raise


def _checkpoint_nodes(bitmaps, data):
    checkpoint = data.get("checkpoint")
    if not checkpoint:
        return []
    return [disk["node"] for disk in data.get("disks", []) if checkpoint in bitmaps.get(disk["node"], {})]


def plan_backup(qmp, names, disks, nbd_socket, registry, checkpoint=None, incremental=None,
                fallback_to_full=False):
    """Resolve the disks and build the plan; raises UserError for anything that cannot work."""
    try:
        chosen = select_disks(list_disks(qmp), disks)
    except LookupError as err:
        raise UserError(str(err)) from None
    if not chosen:
        raise UserError("This VM has no writable disk with a medium to back up; name disks explicitly.")
    return BackupPlan(names, chosen, nbd_socket, registry, checkpoint, incremental, fallback_to_full)
