"""The modules as a test calls them on one VM: a private state directory and a scratch directory filled in."""

import json
import os
import subprocess

from support.modules import run_module
from support.qemu_vm import same

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import process_alive
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import alone, image_info, served
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.engine import checksum_of_image_export


class Backups:
    def __init__(self, vm, workdir):
        self.vm = vm
        self.state_dir = os.path.join(workdir, "state")
        self.scratch = os.path.join(workdir, "scratch")
        os.makedirs(self.scratch, mode=0o700, exist_ok=True)

    def _vm_args(self, args):
        return dict(self.vm.connection_args(), state_dir=self.state_dir, **args)

    def start(self, backup_id="bk1", **args):
        if "qmp_socket" in self.vm.connection_args():  # QEMU under libvirt cannot enter our private test dir
            args.setdefault("scratch_dir", self.scratch)
        return run_module("qemu_backup_start", **self._vm_args(dict(backup_id=backup_id, **args)))

    def stop(self, backup_id="bk1", **args):
        return run_module("qemu_backup_stop", **self._vm_args(dict(backup_id=backup_id, **args)))

    def info(self, **args):
        return run_module("qemu_backup_info", **self._vm_args(args))

    def checkpoint(self, name, **args):
        return run_module("qemu_checkpoint", **self._vm_args(dict(name=name, **args)))

    def copy_all(self, backup, directory, prefix, previous_prefix=None, **args):
        """Copy every disk of a started backup to DIR/PREFIX.DISK.qcow2, as overlays of PREVIOUS_PREFIX."""
        results = {}
        for disk in backup["disks"]:
            dest = os.path.join(directory, "%s.%s.qcow2" % (prefix, disk["disk"]))
            incremental = disk["mode"] == "incremental"
            backing = os.path.join(directory, "%s.%s.qcow2" % (previous_prefix, disk["disk"])) if incremental else None
            result = run_module("qemu_backup_copy", src=disk["url"], dest=dest, backing=backing,
                                dirty_bitmap=disk["dirty_bitmap"], state_dir=self.state_dir, **args)
            assert not result.failed, result
            results[disk["disk"]] = result
        return results

    def full_into_new_repo(self, tmp_path):
        """A new directory tmp_path/repo holding b1, a full backup that opened checkpoint c1; its path."""
        repo = str(tmp_path / "repo")
        os.mkdir(repo)
        self.copy_all(self.start("b1", checkpoint="c1")["backup"], repo, "b1")
        self.stop("b1")
        return repo

    def vm_state_files(self):
        return vm_state_files(self.state_dir)

    def assert_nothing_left(self):
        assert_no_leftovers(self.vm)
        assert self.vm_state_files() == []


def vm_state_files(state_dir):
    """What the VMs' private state directories hold besides their locks and disk records: a backup's state, socket,
    pause record."""
    vms = os.path.join(state_dir, "vms")
    if not os.path.isdir(vms):
        return []
    return sorted(name for vm in os.listdir(vms) for name in os.listdir(os.path.join(vms, vm))
                  if name not in ("lock", "disks.json"))  # the VM's disks as last seen running stay, on purpose


def marks(vm):
    """Every disk's point in the write log, for restores_exactly."""
    return {disk: vm.mark(disk) for disk in vm.disks}


def restores_exactly(vm, tmp_path, disk, top, mark):
    """Whether the chain ending at top, flattened, reads exactly as the disk did at write mark."""
    flat = str(tmp_path / ("flat-%s-%d.raw" % (disk, mark)))
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", top, flat], check=True)
    return same(flat, vm.expected_image(disk, mark, str(tmp_path / ("expected-%s-%d.raw" % (disk, mark)))))


def used_bytes(path):
    """Bytes in use on the file system of path (a test's own tmpfs)."""
    fs = os.statvfs(path)
    return (fs.f_blocks - fs.f_bfree) * fs.f_frsize


def assert_no_leftovers(vm):
    """Nothing of a backup in QEMU, and no scratch image held open (they have no name: look at QEMU's descriptors)."""
    assert vm.leftovers() == dict(nodes=[], moved={}, exports=[], jobs=[], fdsets=[], deleted_files=[], objects=[],
                                  bitmaps={d: [] for d in vm.disks})


def offline_record(flow):
    """The running offline backup's state, as the module keeps it."""
    vms = os.path.join(flow.state_dir, "vms")
    for key in os.listdir(vms):
        path = os.path.join(vms, key, "backup.json")
        if os.path.exists(path):
            with open(path) as stream:
                return json.load(stream)
    return None


def assert_servers_gone(record):
    assert record["servers"] and not any(process_alive(server["owner"]) for server in record["servers"])
    assert not any(server["socket"] and os.path.lexists(server["socket"]) for server in record["servers"])


def image_checksum(path, algorithm):
    """The checksum of the image at path alone, by algorithm, summed by the engine as verify sums it."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        with served(alone(fd, "qcow2"), pass_fds=(fd,)) as url:
            has_backing = "backing-filename" in image_info(str(path))
            return checksum_of_image_export(url, has_backing, algorithm).checksum
    finally:
        os.close(fd)
