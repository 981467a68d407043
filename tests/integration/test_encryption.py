"""Encryption at rest: LUKS-encrypted qcow2 chains from a running VM, restored, verified, and refused without
their secret; the secret never on a command line or in the output."""

import json
import os
import subprocess
import sys
import threading
import time

from support.fleet import PLAYBOOKS, Fleet, assert_clean, assert_ok
from support.flows import Backups
from support.guest import kit_path
from support.modules import ansible_env, run_module, run_playbook
from support.paths import COLLECTIONS
from support.processes import end_process, process_alive
from support.qemu_vm import DiskSpec, MiB, same, virtual_size

SECRET = "correct horse battery staple"
# The guest's plaintext, which no encrypted image may hold.
PATTERN = 0x5A


def backup(vm, tmp_path, **args):
    return run_module("qemu_backup", **dict(vm.connection_args(), repository=str(tmp_path / "repository"), vm="vm1",
                                            state_dir=str(tmp_path / "state"), scratch_dir=str(tmp_path / "scratch"),
                                            **args))


def manifest(tmp_path):
    return json.loads((tmp_path / "repository" / "vm1" / "manifest.json").read_text())


def secret_file(tmp_path, content=SECRET):
    path = tmp_path / ("key-%d" % len(content))
    path.write_text(content)
    path.chmod(0o600)
    return str(path)


def encrypted(tmp_path, content=SECRET):
    """The encryption option, with a fast key slot: the tests' secret is no passphrase to guard."""
    return dict(secret_file=secret_file(tmp_path, content), iter_time=10)


class QemuCommandLines:
    """Every qemu-img, qemu-io, qemu-nbd and QEMU command line seen in /proc while the block runs."""

    def __init__(self):
        self.seen = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        while not self._stop.wait(0.005):
            self.seen.update(qemu_command_lines())


def qemu_command_lines():
    return set(qemu_processes().values())


def qemu_processes():
    """{PID: command line} of the QEMU tools running now."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as stream:
                argv = stream.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if argv and os.path.basename(argv[0]).decode(errors="replace").startswith(("qemu-img", "qemu-io", "qemu-nbd",
                                                                                  "qemu-system")):
            found[int(pid)] = b" ".join(argv).decode(errors="replace")
    return found


def repository_files(tmp_path):
    directory = tmp_path / "repository" / "vm1"
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory)) if name != "lock"}


def test_an_encrypted_chain_restores_and_verifies_and_holds_no_plaintext(vms, tmp_path):
    vm = vms([DiskSpec("vda", size=32 * MiB)], prepare=lambda vm: vm.write("vda", 0, 4 * MiB, PATTERN))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    marks = [vm.mark("vda")]
    with QemuCommandLines() as watched:
        full = backup(vm, tmp_path, encryption=encrypted(tmp_path))
        vm.write("vda", 8 * MiB, 2 * MiB, PATTERN)
        vm.zero("vda", 0, MiB)  # zeros over the full's data: the overlay must hide it
        marks.append(vm.mark("vda"))
        # The secret from a variable this time, the same secret.
        incremental = backup(vm, tmp_path, encryption=dict(secret=SECRET, iter_time=10))
    assert full["summary"]["result"] == "ok" and incremental["summary"]["result"] == "ok", incremental
    assert incremental["summary"]["level"] == "incremental"
    for result in (full, incremental):
        assert SECRET not in json.dumps(result)
    assert any("qemu-nbd" in line and "secret,id=" in line for line in watched.seen), watched.seen
    assert watched.seen and not any(SECRET in line for line in watched.seen)
    backups = manifest(tmp_path)["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental"]
    assert SECRET not in json.dumps(backups)
    for entry in backups:
        [disk] = entry["disks"]
        assert disk["encryption"] == "luks"
        image = tmp_path / "repository" / "vm1" / disk["file"]
        info = json.loads(os.popen("qemu-img info --output=json '%s'" % image).read())
        assert info["encrypted"] and info["format-specific"]["data"]["encrypt"]["format"] == "luks"
        assert bytes([PATTERN]) * 4096 not in image.read_bytes()
    assert_clean(vm)

    for point, entry in enumerate(backups):
        dest = tmp_path / ("restored-%d" % point)
        dest.mkdir()
        restored = run_module("qemu_backup_restore", repository=str(tmp_path / "repository"), vm="vm1",
                              backup=entry["name"], dest=str(dest), encryption=encrypted(tmp_path))
        assert restored["changed"], restored
        expected = vm.expected_image("vda", marks[point], str(tmp_path / "expected.raw"))
        assert same(str(dest / "vda.qcow2"), expected)
    verified = run_module("qemu_backup_verify", repository=str(tmp_path / "repository"), vm="vm1",
                          encryption=encrypted(tmp_path))
    assert not verified.failed and verified["vms"][0]["images_checked"] == 2, verified
    assert all(b["state"] == "ok" for b in verified["vms"][0]["backups"]), verified


def test_a_wrong_or_missing_secret_fails_clearly_and_leaves_nothing(vms, tmp_path, monkeypatch):
    vm = vms([DiskSpec("vda", size=16 * MiB)], prepare=lambda vm: vm.write("vda", 0, MiB, PATTERN))
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the modules' qemu-nbds would have their sockets
    assert backup(vm, tmp_path, encryption=encrypted(tmp_path))["summary"]["result"] == "ok"
    vm.write("vda", 4 * MiB, MiB, PATTERN)
    before = repository_files(tmp_path)
    wrong = backup(vm, tmp_path, encryption=encrypted(tmp_path, "not the secret"))
    image = manifest(tmp_path)["backups"][0]["disks"][0]["file"]
    assert wrong.failed and "encryption secret opens no key slot of %s" % (tmp_path / "repository" / "vm1" / image) \
        in wrong["msg"], wrong
    missing = backup(vm, tmp_path)
    assert missing.failed and "is encrypted: give encryption" in missing["msg"], missing
    assert repository_files(tmp_path) == before
    assert not [line for line in qemu_command_lines() if "qemu-nbd" in line and str(tmp_path) in line]
    assert os.listdir(tmp_path / "tmp") == []
    assert_clean(vm)
    dest = tmp_path / "restored"
    dest.mkdir()
    for encryption in (None, encrypted(tmp_path, "not the secret")):
        refused = run_module("qemu_backup_restore", repository=str(tmp_path / "repository"), vm="vm1",
                             dest=str(dest), **(dict(encryption=encryption) if encryption else {}))
        assert refused.failed and "secret" in refused["msg"] and image in refused["msg"], refused
        assert os.listdir(dest) == []
        unread = run_module("qemu_backup_verify", repository=str(tmp_path / "repository"), vm="vm1",
                            **(dict(encryption=encryption) if encryption else {}))
        assert unread.failed and "secret" in unread["msg"] and image in unread["msg"], unread
    assert repository_files(tmp_path) == before


def test_a_drill_boots_an_encrypted_chain(vms, tmp_path):
    # The guest kit's disk on a VM that runs no guest: only the drill boots it.
    template = os.path.join(kit_path(), "disk.qcow2")
    vm = vms([DiskSpec("vda", size=virtual_size(template), backing=template)], name="guest")
    (tmp_path / "repository").mkdir()
    (tmp_path / "scratch").mkdir()
    for _level in ("full", "incremental"):
        done = backup(vm, tmp_path, encryption=encrypted(tmp_path), freeze="never")
        assert done["summary"]["result"] == "ok", done
    assert done["summary"]["level"] == "incremental"
    drill_args = dict(repository=str(tmp_path / "repository"), vm="vm1", state_dir=str(tmp_path / "state"),
                      accel="tcg", boot_timeout=120)
    refused = run_module("qemu_restore_drill", **drill_args)
    assert refused.failed and "is encrypted (LUKS): give encryption" in refused["msg"], refused
    wrong = run_module("qemu_restore_drill", encryption=encrypted(tmp_path, "not the secret"), **drill_args)
    assert wrong.failed and "encryption secret opens no key slot" in wrong["msg"], wrong
    with QemuCommandLines() as watched:
        drilled = run_module("qemu_restore_drill", encryption=encrypted(tmp_path), **drill_args)
    assert not drilled.failed and drilled["drill"]["passed"], drilled
    assert not any(SECRET in line for line in watched.seen)
    assert os.listdir(tmp_path / "state" / "drills") == []


def test_a_killed_encrypted_copy_leaves_no_server_and_the_next_copy_cleans_up(vms, tmp_path, monkeypatch):
    vm = vms([DiskSpec("vda", size=16 * MiB)], prepare=lambda vm: vm.write("vda", 0, 8 * MiB, PATTERN))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the copy's qemu-nbd has its socket
    flow = Backups(vm, str(tmp_path))
    disk = flow.start("bk1")["backup"]["disks"][0]
    args = dict(src=disk["url"], dest=str(tmp_path / "vda.qcow2"), encryption=encrypted(tmp_path),
                state_dir=flow.state_dir)
    copier = subprocess.Popen(
        [sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules.qemu_backup_copy"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ansible_env() | {"PYTHONPATH": COLLECTIONS})
    copier.stdin.write(json.dumps({"ANSIBLE_MODULE_ARGS": dict(args, bandwidth="1M")}).encode())
    copier.stdin.close()
    deadline = time.monotonic() + 60
    servers = {}
    while not servers and time.monotonic() < deadline and copier.poll() is None:
        time.sleep(0.01)  # the pace of looking: /proc tells no one when a process starts
        servers = {pid: line for pid, line in qemu_processes().items()
                   if "qemu-nbd" in line and str(tmp_path / "tmp") in line}
    assert servers and copier.poll() is None, "the copy must be writing through its qemu-nbd when it is killed"
    end_process(copier.pid)  # SIGKILL: no finally runs in the copy
    copier.wait()
    for pid in servers:
        end_process(pid, None)  # it ends by itself, its holder's connection gone
        assert not process_alive(pid), servers[pid]
    [partial] = [name for name in os.listdir(tmp_path) if name.startswith(".vda.qcow2.part-")]
    again = run_module("qemu_backup_copy", **args)
    assert again["changed"] and again["removed_partials"] == [partial], again
    assert flow.stop("bk1")["changed"]


def test_the_roles_back_up_and_restore_an_encrypted_chain_and_never_show_the_secret(vms, tmp_path):
    vm = vms([DiskSpec("vda", size=16 * MiB)], prepare=lambda vm: vm.write("vda", 0, 2 * MiB, PATTERN))
    fleet = Fleet(tmp_path, {"vm1": vm})
    inventory = json.loads(fleet.inventory.read_text())
    # The secret from a variable, as a vaulted one would be; the restore role takes the backup role's.
    inventory["vms"]["vars"].update(backup_secret=SECRET, qemu_backup_encryption=dict(
        secret="{{ backup_secret }}", iter_time=10))
    fleet.inventory.write_text(json.dumps(inventory))
    outputs = []
    for _level in ("full", "incremental"):
        mark = vm.mark("vda")
        rc, results, output = run_playbook(os.path.join(PLAYBOOKS, "fleet_backup.yml"), str(fleet.inventory),
                                           str(tmp_path / ("results-%d.json" % len(outputs))), more_args=("-vvv",))
        assert rc == 0, output[-3000:]
        outputs += [output, json.dumps(results)]
        vm.write("vda", 4 * MiB, MiB, PATTERN)
    backups = fleet.manifest("vm1")["backups"]
    assert [b["level"] for b in backups] == ["full", "incremental"]
    assert [d.get("encryption") for b in backups for d in b["disks"]] == ["luks", "luks"]
    restored = assert_ok(fleet.restore("vm1", tmp_path / "restored"))
    outputs.append(json.dumps(restored))
    assert same(str(tmp_path / "restored" / "vda.qcow2"), vm.expected_image("vda", mark, str(tmp_path / "e.raw")))
    assert not any(SECRET in output for output in outputs)
