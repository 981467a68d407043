"""The modules as a test calls them on one VM: a private state directory and a scratch directory filled in."""

import os
import subprocess

from support.modules import run_module
from support.qemu_vm import same


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
