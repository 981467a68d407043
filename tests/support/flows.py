"""The modules as a test calls them on one VM: scratch and registry directories filled in."""

import os

from support.modules import run_module


class Backups:
    def __init__(self, vm, workdir):
        self.vm = vm
        self.scratch = os.path.join(workdir, "scratch")
        self.registry = os.path.join(workdir, "checkpoints")
        os.makedirs(self.scratch, exist_ok=True)

    def _qmp_args(self, args):
        return dict(qmp_socket=self.vm.qmp_socket, checkpoint_dir=self.registry, **args)

    def start(self, backup_id="bk1", **args):
        args.setdefault("scratch_dir", self.scratch)
        return run_module("qemu_backup_start", **self._qmp_args(dict(backup_id=backup_id, **args)))

    def stop(self, backup_id="bk1", **args):
        args.setdefault("scratch_dir", self.scratch)
        return run_module("qemu_backup_stop", **self._qmp_args(dict(backup_id=backup_id, **args)))

    def info(self, **args):
        return run_module("qemu_backup_info", **self._qmp_args(args))

    def checkpoint(self, name, **args):
        return run_module("qemu_checkpoint", **self._qmp_args(dict(name=name, **args)))

    def copy_all(self, backup, directory, prefix, previous_prefix=None, **args):
        """Copy every disk of a started backup to DIR/PREFIX.DISK.qcow2, as overlays of PREVIOUS_PREFIX."""
        results = {}
        for disk in backup["disks"]:
            dest = os.path.join(directory, "%s.%s.qcow2" % (prefix, disk["disk"]))
            incremental = disk["mode"] == "incremental"
            backing = os.path.join(directory, "%s.%s.qcow2" % (previous_prefix, disk["disk"])) if incremental else None
            result = run_module("qemu_backup_copy", src=disk["url"], dest=dest, backing=backing,
                                dirty_bitmap=disk["dirty_bitmap"], **args)
            assert not result.failed, result
            results[disk["disk"]] = result
        return results

    def assert_nothing_left(self):
        assert self.vm.leftovers() == dict(nodes=[], exports=[], jobs=[], bitmaps={d: [] for d in self.vm.disks})
        assert os.listdir(self.scratch) == []
