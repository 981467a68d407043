"""Bad input, as a user would type it, over every module: a clear error that names the option, no traceback, nothing
made at the bad path and nothing changed outside the test's directory. Then the two defects of the sweep: a
repository reached through a symbolic link, and a manifest that does not match its schema."""

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from support.modules import COLLECTIONS, has_action, run_action, run_module
from support.qemu_vm import DiskSpec, MiB

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.repository import Repository

# Outside the test's directory: what no bad input may change (names and modification times of their entries), and
# fleetbackup's default directories, which must not come to exist.
WATCHED = ("/etc", "/var/tmp", "/root", "/usr/lib", "/")
DEFAULT_DIRECTORIES = ("/var/lib/fleetbackup", "/var/lib/fleetbackup-qemu")


def watched_state():
    state = {path: os.path.lexists(path) for path in DEFAULT_DIRECTORIES}
    for directory in WATCHED:
        for name in os.listdir(directory):
            try:
                state[os.path.join(directory, name)] = os.lstat(os.path.join(directory, name)).st_mtime_ns
            except FileNotFoundError:
                continue
    return state


def run_raw(module, args, tmpdir):
    """(result, stdout and stderr) of a module run as Ansible runs it; an action's temporary files go in tmpdir."""
    if has_action(module):
        return run_action(module, env=dict(TMPDIR=tmpdir), **args)
    process = subprocess.run(
        [sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules." + module],
        input=json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=COLLECTIONS), timeout=300, check=False)
    output = (process.stdout + process.stderr).decode(errors="replace")
    return json.loads(process.stdout), output


class GarbageServer:
    """A unix socket that answers every client with bytes that begin with a UTF-16 byte-order mark."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            with client:
                try:
                    client.sendall(b"\xff\xfe{\x00\"\x00Q\x00\n")
                except OSError:
                    pass

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)


@pytest.fixture
def garbage_socket(tmp_path):
    path = str(tmp_path / "garbage.sock")
    server = GarbageServer(path)
    yield path
    server.close()


def cases(t, vm_socket, garbage):
    """(module, arguments, what the message must name, a path that must not come to exist)."""
    state = dict(state_dir=t["state"])
    missing = os.path.join(t["root"], "missing")
    manifest_repository = dict(repository=t["bad_manifest"], vm="vm1")
    return [
        ("qemu_backup_start", dict(qmp_socket=missing + ".sock", backup_id="b1", **state), "qmp_socket",
         missing + ".sock"),
        ("qemu_backup_start", dict(qmp_socket=garbage, backup_id="b1", **state), "qmp_socket", None),
        ("qemu_backup_start", dict(backup_id="b1", **state), "qmp_socket, domain", None),
        ("qemu_backup_start", dict(qmp_socket=vm_socket, backup_id="../b1", **state), "backup_id", None),
        ("qemu_backup_start", dict(qmp_socket=vm_socket, backup_id="b1", scratch_size="lots", **state),
         "scratch_size", None),
        ("qemu_backup_start", dict(qmp_socket=vm_socket, backup_id="b1", scratch_dir=missing, **state),
         "scratch_dir", missing),
        ("qemu_backup_start", dict(qmp_socket=vm_socket, backup_id="b1", nbd_tcp=dict(host="0.0.0.0", plain=True),
                                   **state), "nbd_tcp", None),
        ("qemu_backup_stop", dict(qmp_socket=vm_socket, backup_id="b 1", **state), "backup_id", None),
        ("qemu_backup_info", dict(qmp_socket=vm_socket, domain="web1", **state), "qmp_socket", None),
        ("qemu_checkpoint", dict(qmp_socket=vm_socket, name="c1", state="sideways", **state),
         "value of state must be one of", None),
        ("qemu_backup", dict(repository=os.path.join(missing, "r1"), vm="vm1", **state),
         "step all needs the VM: qmp_socket or domain", os.path.join(missing, "r1")),
        ("qemu_backup", dict(qmp_socket=vm_socket, repository=os.path.join(missing, "r2"), vm="vm1", lock_ttl=10,
                             **state), "lock_ttl must be at least 60", os.path.join(missing, "r2")),
        ("qemu_backup", dict(qmp_socket=vm_socket, repository=os.path.join(missing, "r3"), vm="vm1", max_age="soon",
                             **state), "Invalid duration 'soon'", os.path.join(missing, "r3")),
        ("qemu_backup", dict(qmp_socket=vm_socket, repository=os.path.join(missing, "r4"), vm="vm1", bandwidth="fast",
                             **state), "Invalid bandwidth", os.path.join(missing, "r4")),
        ("qemu_backup", dict(qmp_socket=vm_socket, repository=os.path.join(missing, "r5"), vm="../vm1", **state),
         "VM name", os.path.join(missing, "r5")),
        ("qemu_backup", dict(qmp_socket=vm_socket, vm="vm1", **state), "repository", None),
        ("qemu_backup", dict(qmp_socket=vm_socket, repository=os.path.join(missing, "r7"), vm="vm1", compress="zstd",
                             encryption=dict(format="luks", secret="not-shown"), **state),
         "compress=zstd and encryption cannot go together", os.path.join(missing, "r7")),
        ("qemu_backup", dict(qmp_socket=vm_socket, repository=os.path.join(missing, "r8"), vm="vm1", keep_last=3,
                             encryption=dict(format="luks", secret="not-shown"), **state),
         "with encryption, keep whole chains with keep_chains", os.path.join(missing, "r8")),
        ("qemu_backup", dict(qmp_socket=vm_socket, **manifest_repository, **state), "does not match its schema",
         None),
        ("qemu_backup", dict(step="copy", repository=os.path.join(missing, "r6"), vm="vm1", **state),
         "step copy needs run, as the step before returned it", os.path.join(missing, "r6")),
        ("qemu_backup", dict(step="follow", job="../x", **state), "is not a job of qemu_backup", None),
        ("qemu_backup", dict(step="follow", job="0123456789abcdef", **state), "No backup run job 0123456789abcdef",
         None),
        ("qemu_backup_report", dict(summaries=[dict(vm="vm1", result="ok")], report_dir=t["etc_link"]),
         "choose another report_dir", None),
        ("qemu_backup_report", dict(summaries=[dict(vm="vm1", result="ok")], report_dir=os.path.join(missing, "p1"),
                                    rpo="soon"), "Invalid duration 'soon'", os.path.join(missing, "p1")),
        ("qemu_backup_report", dict(summaries=[dict(vm="vm1", result="ok")], report_dir=os.path.join(missing, "p2"),
                                    metrics_dir=os.path.join(missing, "m")), "of metrics_dir does not exist",
         os.path.join(missing, "p2")),
        ("qemu_backup_copy", dict(src="http://example.invalid/vda", dest=os.path.join(t["root"], "x.qcow2"),
                                  **state), "src", os.path.join(t["root"], "x.qcow2")),
        ("qemu_backup_copy", dict(src="nbd+unix:///vda?socket=" + garbage, dest=os.path.join(missing, "x.qcow2"),
                                  **state), "dest", missing),
        ("qemu_backup_copy", dict(src="nbd+unix:///vda?socket=" + garbage, dest=os.path.join(t["root"], "y.qcow2"),
                                  bandwidth="fast", **state), "bandwidth", os.path.join(t["root"], "y.qcow2")),
        ("qemu_backup_copy_status", dict(dest=os.path.join(t["root"], "x.qcow2"), wait="soon", **state), "wait",
         None),
        ("qemu_backup_restore", dict(repository=t["repository"], vm="vm1", dest=missing), "dest", missing),
        ("qemu_backup_restore", dict(repository=t["etc_link"], vm="vm1", dest=t["root"]), "follow_repository_link",
         "/etc/vm1"),
        ("qemu_backup_restore", dict(manifest_repository, dest=t["root"]), "backups", None),
        ("qemu_backup_repository", dict(repository=t["etc_link"], vm="fbtest-vm", action="lock"),
         "follow_repository_link", "/etc/fbtest-vm"),
        ("qemu_backup_repository", dict(repository=t["repository"], vm="../vm1", action="lock"), "VM name", None),
        ("qemu_backup_repository", dict(repository="/usr/lib/fbtest-repository", vm="vm1", action="lock"),
         "a directory of the system", "/usr/lib/fbtest-repository"),
        ("qemu_backup_repository", dict(repository=t["repository"], vm="vm1", action="lock", lock_ttl=5),
         "lock_ttl", os.path.join(t["repository"], "vm1")),
        ("qemu_backup_repository", dict(manifest_repository, action="newest"), "backups", None),
        ("qemu_backup_verify", dict(repository=missing), "repository", missing),
        ("qemu_backup_verify", dict(repository=t["repository"], backups=["b1"]), "required by 'backups': vm", None),
        ("qemu_backup_verify", dict(manifest_repository), "backups", None),
        ("qemu_restore_drill", dict(repository=t["repository"], vm="vm1", boot_timeout=0, **state), "boot_timeout",
         None),
        ("qemu_restore_drill", dict(repository=t["repository"], vm="vm1", console_silence_timeout=-1, **state),
         "console_silence_timeout", None),
        ("qemu_restore_drill", dict(manifest_repository, **state), "backups", None),
        ("qemu_vms_info", dict(hypervisor="hv1", timeout="soon", **state), "timeout", None),
        ("qemu_vms_info", dict(hypervisor="hv1", repository=t["etc_link"], **state), "follow_repository_link", None),
    ]


def test_bad_input_to_every_module_fails_clearly_and_changes_nothing(vms, tmp_path, garbage_socket):
    vm = vms([DiskSpec("vda")])
    root = tmp_path / "files"
    root.mkdir()
    os.symlink("/etc", str(root / "etc-link"))
    (root / "repository").mkdir()
    bad = root / "bad-manifest"
    (bad / "vm1").mkdir(parents=True)
    manifest = json.dumps(dict(format=1, vm="vm1", backups="b1"))
    (bad / "vm1" / "manifest.json").write_text(manifest)
    paths = dict(root=str(root), state=str(tmp_path / "state"), repository=str(root / "repository"),
                 etc_link=str(root / "etc-link"), bad_manifest=str(bad))
    table = cases(paths, vm.qmp_socket, garbage_socket)
    assert {module for module, _args, _named, _path in table} == {
        name[:-3] for name in os.listdir(os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu",
                                                      "plugins", "modules")) if name.endswith(".py")}
    before = watched_state()
    for module, args, named, bad_path in table:
        result, output = run_raw(module, args, str(tmp_path))
        assert result.get("failed"), (module, args, result)
        assert named in result["msg"], (module, args, result["msg"])
        assert "Traceback" not in output and "codec" not in result["msg"], (module, args, output)
        assert bad_path is None or not os.path.lexists(bad_path), (module, args, bad_path)
    assert watched_state() == before
    assert (bad / "vm1" / "manifest.json").read_text() == manifest and os.listdir(bad / "vm1") == ["manifest.json"]
    assert os.listdir(root / "repository") == []
    assert vm.leftovers()["nodes"] == [] and vm.named_bitmaps("vda") == {}


def test_a_repository_reached_through_a_link_is_refused_unless_followed_and_then_checked(tmp_path):
    lock = dict(vm="vm1", action="lock")
    link = tmp_path / "backup"
    os.symlink("/etc", str(link))
    refused = run_module("qemu_backup_repository", repository=str(link), **lock)
    assert refused.failed and "%s is a symbolic link to /etc" % link in refused["msg"]
    assert not os.path.lexists("/etc/vm1")
    system = run_module("qemu_backup_repository", repository=str(link), follow_repository_link=True, **lock)
    assert system.failed and "a directory of the system" in system["msg"] and not os.path.lexists("/etc/vm1")

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    os.unlink(str(link))
    os.symlink(str(shared), str(link))
    writable = run_module("qemu_backup_repository", repository=str(link), follow_repository_link=True, **lock)
    assert writable.failed and "can be written by group or others (mode 777)" in writable["msg"]
    assert os.listdir(shared) == []

    # A link of the user's own, to a directory only root can change: followed, and the results say where to.
    nfs = tmp_path / "nfs"
    nfs.mkdir(mode=0o755)
    os.unlink(str(link))
    os.symlink(str(nfs), str(link))
    taken = run_module("qemu_backup_repository", repository=str(link), follow_repository_link=True, **lock)
    assert not taken.failed and taken["changed"] and taken["directory"] == str(nfs / "vm1")
    assert os.path.isfile(nfs / "vm1" / "lock")
    newest = run_module("qemu_backup_repository", repository=str(link), follow_repository_link=True, vm="vm1",
                        action="newest")
    assert newest["directory"] == str(nfs / "vm1") and newest["backup"] is None

    # A VM's directory that is a link is refused the same way, even in a real repository.
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(str(nfs / "vm1"), str(real / "vm2"))
    vm_link = run_module("qemu_backup_repository", repository=str(real), vm="vm2", action="newest")
    assert vm_link.failed and "The directory of VM vm2 %s is a symbolic link to %s" % (real / "vm2", nfs / "vm1") \
        in vm_link["msg"]
    followed = run_module("qemu_backup_repository", repository=str(real), vm="vm2", action="newest",
                          follow_repository_link=True)
    assert not followed.failed and followed["directory"] == str(nfs / "vm1")
    # Followed or not, a VM's directory never leads into the system.
    os.symlink("/etc", str(real / "vm3"))
    into_etc = run_module("qemu_backup_repository", repository=str(real), vm="vm3", action="lock",
                          follow_repository_link=True)
    assert into_etc.failed and "is /etc, a directory of the system" in into_etc["msg"]
    assert not os.path.lexists("/etc/lock")

    # Check mode before the first backup: a repository that does not exist yet plans a full backup, and stays so.
    first = tmp_path / "first"
    planned = run_module("qemu_backup_repository", repository=str(first), vm="vm1", action="lock", check_mode=True)
    assert not planned.failed and planned["directory"] == str(first / "vm1") and not os.path.lexists(first)


def test_the_repository_is_used_through_the_descriptor_it_was_opened_as(tmp_path):
    """Renamed away and replaced by a link after it was opened, the repository still gets the writes, not the link's
    target."""
    root = tmp_path / "backup"
    (root / "vm1").mkdir(parents=True)
    repository = Repository(str(root), "vm1")
    assert repository.path == str(root / "vm1")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "vm1").mkdir(parents=True)
    os.rename(str(root), str(tmp_path / "moved"))
    os.symlink(str(elsewhere), str(root))
    repository.save(dict(format=1, vm="vm1", backups=[]))
    assert os.listdir(elsewhere / "vm1") == []
    assert os.listdir(tmp_path / "moved" / "vm1") == ["manifest.json"]


def test_every_reader_checks_the_manifest_against_its_schema(tmp_path):
    repository = tmp_path / "repository"
    (repository / "vm1").mkdir(parents=True)
    manifest = repository / "vm1" / "manifest.json"
    backup = dict(name="b1", level="full", parent=None, chain="b1", checkpoint="c1", finished=1,
                  disks=[dict(disk="vda", file="b1.vda.qcow2", size=MiB)])
    for damaged, field in ((dict(backups="b1"), "backups is \"b1\", expected a list of backups"),
                           (dict(backups=[dict(backup, disks="vda")]), "backups[0].disks is \"vda\""),
                           (dict(backups=[dict(backup, finished="yesterday")]), "backups[0].finished is"),
                           (dict(backups=[{k: v for k, v in backup.items() if k != "name"}]),
                            "backups[0].name is missing")):
        content = json.dumps(dict(format=1, vm="vm1", **damaged))
        manifest.write_text(content)
        for module, args in (("qemu_backup_verify", {}), ("qemu_backup_restore", dict(dest=str(tmp_path))),
                             ("qemu_restore_drill", dict(state_dir=str(tmp_path / "state"))),
                             ("qemu_backup_repository", dict(action="newest"))):
            result = run_module(module, repository=str(repository), vm="vm1", **args)
            assert result.failed and "The manifest %s does not match its schema: %s" % (manifest, field) \
                in result["msg"], (module, result["msg"])
        assert manifest.read_text() == content and os.listdir(repository / "vm1") == ["manifest.json"]


def test_vms_info_lists_as_missing_only_vm_directories(tmp_path):
    repository = tmp_path / "repository"
    for name in ("certs", "state", "gone", ".hidden"):
        (repository / name).mkdir(parents=True)
    (repository / "gone" / "manifest.json").write_text(json.dumps(dict(format=1, vm="gone", backups=[])))
    (repository / "state" / "notes.txt").write_text("")
    found = run_module("qemu_vms_info", hypervisor="hv1", repository=str(repository), state_dir=str(tmp_path / "st"))
    assert not found.failed and found["vms"] == [] and found["missing"] == ["gone"]


def test_a_socket_that_answers_in_utf16_gets_a_message_without_codec_words(garbage_socket, tmp_path):
    result = run_module("qemu_backup_info", qmp_socket=garbage_socket, state_dir=str(tmp_path / "state"))
    assert result.failed and result["msg"] == (
        "%s (qmp_socket) did not answer as a QEMU QMP monitor (it sent bytes that are not QMP's JSON greeting): "
        "check that it is a -qmp socket, not a serial console, HMP monitor or NBD socket." % garbage_socket)
