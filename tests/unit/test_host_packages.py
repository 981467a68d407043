"""Every program and file that the tests, the demo, the bench and the modules use comes from a package that the
Makefile installs, so that `make test` passes on a fresh Debian 12 machine.

The Python sources are scanned for the programs they run (the first word of each argv list); each must be in NEEDS,
which names its package; each package must be in the Makefile's lists, and on this machine dpkg must agree that the
package owns the program or file.
"""

import ast
import functools
import os
import shutil
import subprocess

import pytest

from support.paths import ROOT

# What a test, the demo or the modules need, and what only `make bench` needs (BENCH_APT_PACKAGES).
TESTS, BENCH = "APT_PACKAGES", "BENCH_APT_PACKAGES"

# Program or absolute path: (Debian package, which list of the Makefile installs it).
NEEDS = {
    "qemu-system-x86_64": ("qemu-system-x86", TESTS),
    "/usr/share/seabios/bios-256k.bin": ("seabios", TESTS),  # the drill's and the guests' BIOS
    "/usr/share/OVMF/OVMF_CODE_4M.fd": ("ovmf", TESTS),  # the drill's UEFI firmware and empty variable stores
    "/usr/share/OVMF/OVMF_VARS_4M.fd": ("ovmf", TESTS),
    "/usr/share/OVMF/OVMF_CODE_4M.ms.fd": ("ovmf", TESTS),
    "/usr/share/OVMF/OVMF_VARS_4M.ms.fd": ("ovmf", TESTS),
    "qemu-img": ("qemu-utils", TESTS),
    "qemu-io": ("qemu-utils", TESTS),
    "qemu-nbd": ("qemu-utils", TESTS),
    "nbdcopy": ("libnbd-bin", TESTS),
    "nbdinfo": ("libnbd-bin", TESTS),
    "/usr/lib/python3/dist-packages/nbd.py": ("python3-libnbd", TESTS),
    "/usr/lib/python3/dist-packages/xxhash/__init__.py": ("python3-xxhash", TESTS),  # the block checksum
    "/usr/lib/python3/dist-packages/zstandard/__init__.py": ("python3-zstandard", TESTS),  # compress=zstd
    "libvirtd": ("libvirt-daemon", TESTS),
    "virtlogd": ("libvirt-daemon", TESTS),
    "virsh": ("libvirt-clients", TESTS),
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so": ("libvirt-daemon-driver-qemu", TESTS),
    "/usr/lib/python3/dist-packages/libvirt.py": ("python3-libvirt", TESTS),
    "/usr/sbin/sshd": ("openssh-server", TESTS),
    "ssh": ("openssh-client", TESTS),  # Ansible's ssh connection, in the SSH fleet tests
    "ssh-keygen": ("openssh-client", TESTS),
    "openssl": ("openssl", TESTS),
    "mount": ("mount", TESTS),
    "umount": ("mount", TESTS),
    "mkfs.ext4": ("e2fsprogs", TESTS),  # guest/build-disk.sh
    "e2fsck": ("e2fsprogs", TESTS),
    "debugfs": ("e2fsprogs", TESTS),
    "dumpe2fs": ("e2fsprogs", TESTS),
    "mke2fs": ("e2fsprogs", TESTS),  # bench/usr_disk.py: the storage benches' ext4 copy of /usr
    "shellcheck": ("shellcheck", TESTS),  # ansible-test sanity's shellcheck test, which without it only warns
    "git": ("git", TESTS),  # tests/sanity/run.sh snapshots the tree with it
    "mawk": ("mawk", TESTS),  # guest/build-disk.sh's awk
    "virtnbdbackup": ("virtnbdbackup", BENCH),
    "virtnbdrestore": ("virtnbdbackup", BENCH),
}

# Programs of Debian's essential packages, on every Debian machine.
ESSENTIAL = {"sh", "true", "cp", "runuser", "unshare", "dpkg-query", "flock", "gzip", "dd", "truncate", "ldd", "find",
             "dpkg-deb", "xargs", "sha256sum", "realpath"}

# Words the scan takes for programs that are none the Makefile could install: every other word must be in NEEDS or
# ESSENTIAL, installed here or not.
NOT_FROM_THE_MAKEFILE = {
    "make": "what runs the Makefile",
    "apt-get": "what installs the Makefile's lists",
    "ansible-playbook": "the venv's, which the Makefile makes",
    "file": "a QAPI block driver's name in a fake schema (test_backup_plan)",
    "on-cbw-error": "a QAPI member in a fake schema (test_backup_plan)",
    "create": "a qcow2 writer's step (test_qcow2_writer)",
    "info": "qemu-img's subcommand (qemu_img.py)",
    "qemu_backup": "a role name (test_module_contracts)",
}

# What the shell scripts run, which the scan of Python sources cannot see.
SCRIPT_PROGRAMS = {"mkfs.ext4", "mount", "umount", "qemu-img", "qemu-io", "qemu-system-x86_64", "flock", "gzip", "dd",
                   "truncate", "ldd", "find", "git", "mawk", "dpkg-deb", "xargs", "sha256sum", "realpath"}

SCANNED = ("tests", "bench", "demo", "plugins")


@functools.lru_cache(maxsize=None)
def makefile_lists():
    output = subprocess.run(["make", "-s", "-C", ROOT, "apt-lists"], stdout=subprocess.PIPE, check=True,
                            universal_newlines=True).stdout
    lists = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    return {name: set(value.split()) for name, value in lists.items()}


def argv_programs(tree):
    """The first word of every list literal of strings that is run: a call's first argument, a list that another
    is added to, an assigned list, or a returned list."""
    candidates = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            candidates.append(node.args[0])
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            candidates.append(node.left)
        elif isinstance(node, ast.Assign):
            candidates.append(node.value)
        elif isinstance(node, ast.Return) and node.value is not None:
            candidates.append(node.value.elts[0] if isinstance(node.value, ast.Tuple) and node.value.elts
                              else node.value)
    for candidate in candidates:
        if isinstance(candidate, ast.List) and candidate.elts and isinstance(candidate.elts[0], ast.Constant):
            word = candidate.elts[0].value
            if isinstance(word, str) and word and "/" not in word and " " not in word and not word.startswith("-"):
                yield word


def used_programs():
    used = {}
    for top in SCANNED:
        for directory, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    with open(path) as stream:
                        for word in argv_programs(ast.parse(stream.read(), path)):
                            used.setdefault(word, os.path.relpath(path, ROOT))
    return used


def owner(path):
    """The packages that dpkg says own path; dpkg may know it by its name before the /usr merge (/sbin/e2fsck)."""
    names = {path, os.path.realpath(path)}
    names |= {name[len("/usr"):] for name in names if name.startswith("/usr/")}
    for name in sorted(names):
        found = subprocess.run(["dpkg-query", "-S", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               universal_newlines=True, check=False)
        if found.returncode == 0:
            return {package.strip().split(":")[0] for line in found.stdout.splitlines()
                    for package in line.rsplit(": ", 1)[0].split(",")}
    return set()


def test_every_program_that_is_run_is_known_with_its_package():
    programs = used_programs()
    # The scan must see the programs it is for; a scan that finds nothing would pass anything.
    assert {"qemu-img", "qemu-system-x86_64", "qemu-nbd", "nbdcopy", "virtnbdbackup"} <= set(programs)
    unknown = {word: where for word, where in programs.items()
               if word not in NEEDS and word not in ESSENTIAL and word not in NOT_FROM_THE_MAKEFILE}
    assert not unknown, ("programs run with no package in NEEDS: %s; add each with its Debian package (dpkg-query -S) "
                         "and the Makefile list that installs it" % unknown)


@pytest.mark.parametrize("need", sorted(NEEDS) + sorted(SCRIPT_PROGRAMS - set(NEEDS)))
def test_each_need_comes_from_a_package_that_the_makefile_installs(need):
    lists = makefile_lists()
    if need in ESSENTIAL:
        package, where = None, None
    else:
        package, where = NEEDS[need]
        listed = lists[TESTS] | (lists[BENCH] if where == BENCH else set())
        assert package in listed, "%s needs the Debian package %s, which is missing from the Makefile's %s" % (
            need, package, where)
    path = need if need.startswith("/") else shutil.which(need, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if where == BENCH and not os.path.exists(path or "/nonexistent"):
        pytest.skip("%s is installed by make bench (%s), not by make test" % (need, package))
    assert path and os.path.exists(path), "%s is not on this machine: install %s (make installs the lists)" % (
        need, package or "it")
    owners = owner(path)
    if package:
        assert package in owners, "%s comes from %s, not %s: correct NEEDS" % (path, sorted(owners), package)
    else:
        assert owners, "%s belongs to no Debian package: give it its package in NEEDS" % path
        essential = subprocess.run(["dpkg-query", "-W", "-f=${Essential}\n", *sorted(owners)],
                                   stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.split()
        assert "yes" in essential, "%s (from %s) is not essential: give it its package in NEEDS" % (path, owners)
