# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""Restore drills: a backup boots, and its guest says that its file systems are sound.

The disks of a recorded backup (each the top of its chain in the repository, or an image restored from it)
boot through the firmware and their own bootloader in a QEMU of the drill's own:
  * isolated: no network device, no display, no USB, no shared directory, seccomp (-sandbox on with every
    option denied), no reboot (a guest that reboots ends the drill);
  * on throwaway qcow2 overlays, so that the repository's or restored images are never written (QEMU opens
    backing files read-only);
  * with the machine type, UEFI firmware and disk buses of the backup's domain XML, and a copy of its UEFI
    variables, when the backup has them (libvirt domains); else q35 with SeaBIOS and virtio disks;
  * reached only through its guest agent, on a socket the drill listens on itself and hands to QEMU;
  * killed by its PID when the drill ends, and with the drill's process if that dies (PR_SET_PDEATHSIG).
The drill's files live in a directory of its own under <state_dir>/drills, removed at the end; a drill that
was killed leaves its directory, which the next drill removes.

Checks: the agent answers within boot_timeout; it lists the guest's mounted file systems on disks
(guest-get-fsinfo); the kernel log (dmesg, on Linux guests) reports no file system or disk error, such as a
file system remounted read-only; and the user's command, run through guest-exec, exits 0.

The machine it boots is drill_machine.py's; whether a booting guest is stuck, console_watch.py's.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import no_encryption
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.console_watch import ConsoleWatch, DrillFailed
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.drill_machine import OVMF_VARS
from ansible_collections.fleetbackup.qemu.plugins.module_utils._vm.guest_agent import (
    GuestAgent,
    GuestAgentCommandError,
    GuestAgentError,
    GuestAgentTimeout,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import PrivateDir, create_exclusive
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.processes import (
    die_with_parent,
    process_alive,
    this_process,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.qemu_img import (
    checked_qemu_img,
    explicit_chain,
    image_info,
)

AGENT_CHANNEL = "org.qemu.guest_agent.0"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
DEFAULT_MEMORY_MIB = 1024
CONSOLE_LINES = 15
OUTPUT_BYTES = 4096
SYNC_INTERVAL = 2.0  # while the guest boots, a sync is sent again this often
QEMU_EXIT_WAIT = 5.0  # after the agent's socket closed, for QEMU to exit
AGENT_TIMEOUT = 30.0  # for each answer of the agent once it is up
OWNER = "owner.json"
# What a kernel says when a file system or its disk is not sound.
FILESYSTEM_ERRORS = re.compile(r"EXT[234]-fs error|EXT[234]-fs \(.*\): (error|warning)|XFS \(.*\): .*(corrupt|shut"
                               r"ting down)|BTRFS (error|critical)|I/O error|Remounting filesystem read-only|"
                               r"journal commit I/O error|FAT-fs \(.*\): error", re.IGNORECASE)


def drill_directory(state_dir):
    """A new directory of this drill's own under <state_dir>/drills; those of dead drills are removed first."""
    drills = PrivateDir(state_dir).ensure().child("drills")
    for name in os.listdir(drills.path):
        path = os.path.join(drills.path, name)
        owner = PrivateDir(path).read_json(OWNER) if os.path.isdir(path) else None
        if owner is None and time.time() - os.lstat(path).st_mtime < 60:
            continue  # a drill that is making its directory right now
        if owner is None or not process_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
    mine = drills.child("drill-%s" % secrets.token_hex(6))
    mine.write_json(OWNER, this_process())
    return mine.path


class Drill:
    """Boot disks on overlays in an isolated QEMU, wait for the agent, run the checks; run() gives the result."""

    def __init__(self, workdir, disks, machine, accel, memory_mib, cpus, nvram=None, encryption=None):
        self.workdir = workdir
        self.encryption = encryption  # opens the encrypted images beneath the overlays
        self.disks = disks
        self.machine = machine
        self.accel = accel
        self.memory_mib = memory_mib or machine.memory_mib or DEFAULT_MEMORY_MIB
        self.cpus = cpus
        self.nvram = nvram  # the backup's UEFI variables (bytes); for UEFI without them, the host's empty store
        self.process = None
        self.listener = None
        self.agent = None

    def path(self, name):
        return os.path.join(self.workdir, name)

    def run(self, boot_timeout, check_filesystems, command, command_timeout, silence_timeout=0):
        started = time.monotonic()
        result = dict(passed=False, problems=[], boot_seconds=None, seconds=None, filesystems=[], command=None,
                      console=[])
        try:
            self._boot(started, boot_timeout, silence_timeout)
            result["boot_seconds"] = round(time.monotonic() - started, 3)
            if check_filesystems:
                result["filesystems"] = self._check_filesystems(result["problems"])
            if command:
                result["command"] = self._run_command(command, command_timeout, result["problems"])
        except DrillFailed as failure:
            result["problems"].append(str(failure))
        except GuestAgentError as err:
            result["problems"].append("the guest agent failed: %s" % err)
        finally:
            self.stop()
        result["passed"] = not result["problems"]
        if not result["passed"]:
            result["console"] = self.console_tail()
        result["seconds"] = round(time.monotonic() - started, 3)
        return result

    def command_line(self, agent_fd, secret_args=()):
        machine = self.machine
        options = "%s,accel=%s" % (machine.machine, self.accel)
        if machine.secure:
            options += ",smm=on"
        args = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-nic", "none",
                "-no-reboot", "-sandbox", SANDBOX, "-machine", options, "-m", str(self.memory_mib),
                "-smp", str(self.cpus), "-chardev", "file,id=console,path=%s" % self.path("console.log"),
                "-serial", "chardev:console",
                "-chardev", "socket,id=agent,fd=%d,server=on,wait=off" % agent_fd,
                "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=agent,name=%s" % AGENT_CHANNEL]
        args += list(secret_args)
        if machine.loader:
            if machine.secure:
                args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
            args += ["-drive", "if=pflash,format=raw,readonly=on,file=%s" % machine.loader]
            if self.nvram is not None:
                args += ["-drive", "if=pflash,format=raw,file=%s" % self.path("nvram.fd")]
        sata = scsi = 0
        for index, disk in enumerate(self.disks):
            node = "disk%d" % index
            args += ["-blockdev", "driver=file,filename=%s,node-name=%s-file" % (self.path(node + ".qcow2"), node),
                     "-blockdev", self._overlay_node(disk, node)]
            if disk.bus == "virtio":
                device = "virtio-blk-pci,drive=%s" % node
            elif disk.bus in ("sata", "ide"):
                device = "ide-hd,drive=%s,bus=ide.%d" % (node, sata)
                sata += 1
            elif disk.bus == "scsi":
                if not scsi:
                    args += ["-device", "virtio-scsi-pci,id=scsi0"]
                device = "scsi-hd,drive=%s,bus=scsi0.0,scsi-id=%d" % (node, scsi)
                scsi += 1
            else:
                raise UserError("Disk %s is on a %s bus, which drills do not emulate (virtio, sata, ide, scsi)."
                                % (disk.name, disk.bus))
            args += ["-device", "%s,bootindex=%d" % (device, index)]
        return args

    def _overlay_node(self, disk, node):
        """The overlay's -blockdev; over an encrypted chain, with the whole chain spelt out and given the secret."""
        if self.encryption is None:
            return "driver=qcow2,file=%s-file,node-name=%s" % (node, node)
        return json.dumps({"driver": "qcow2", "file": "%s-file" % node, "node-name": node,
                           "backing": explicit_chain(disk.image)}, sort_keys=True)

    def prepare(self):
        """The throwaway overlays and the copy of the UEFI variables, all new files of ours (0600)."""
        for index, disk in enumerate(self.disks):
            info = image_info(disk.image)
            overlay = create_exclusive(self.workdir, "disk%d.qcow2" % index)
            try:
                # -u: the backing image is not opened here; QEMU opens it read-only.
                checked_qemu_img("create", "-q", "-u", "-f", "qcow2", "-b", disk.image, "-F", info["format"],
                                 "/dev/fd/%d" % overlay.fd, info["virtual-size"], pass_fds=(overlay.fd,))
            finally:
                os.close(overlay.fd)
        if self.machine.loader and self.nvram is None:
            try:
                with open(OVMF_VARS[self.machine.secure], "rb") as stream:
                    self.nvram = stream.read()
            except FileNotFoundError:
                raise UserError("The backup boots UEFI and kept no UEFI variables, and this host has no empty store "
                                "%s: install ovmf." % OVMF_VARS[self.machine.secure]) from None
        if self.nvram is not None:
            copy = create_exclusive(self.workdir, "nvram.fd")
            with os.fdopen(copy.fd, "wb") as stream:
                stream.write(self.nvram)

    def _boot(self, started, boot_timeout, silence_timeout):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.listener.bind(self.path("agent.sock"))
        except OSError as err:
            raise UserError("Cannot listen on %s (%s): choose a shorter state_dir (a socket path holds 107 bytes)."
                            % (self.path("agent.sock"), err.strerror)) from None
        self.listener.listen(1)
        with open(self.path("qemu.log"), "wb") as log, (self.encryption or no_encryption()).qemu_args() as secret:
            try:
                self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                    self.command_line(self.listener.fileno(), secret[0]), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=log, pass_fds=(self.listener.fileno(),) + secret[1], preexec_fn=die_with_parent)
            except FileNotFoundError:
                raise UserError("qemu-system-x86_64 is not installed: install qemu-system-x86.") from None
        self.agent = GuestAgent(self.path("agent.sock"), AGENT_TIMEOUT)
        deadline = started + boot_timeout
        connected = False
        console = ConsoleWatch(self.path("console.log"), silence_timeout, self.process.pid)
        while True:
            if self.process.poll() is not None:
                raise self._exited_before_the_agent()
            console.check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DrillFailed("no guest agent answered within %s s of the start: the guest did not boot, or "
                                  "runs no qemu-guest-agent on its virtio-serial port %s (see the console)"
                                  % (boot_timeout, AGENT_CHANNEL))
            try:
                if connected:
                    self.agent.sync(min(SYNC_INTERVAL, remaining))
                else:
                    connected = True
                    self.agent.connect(min(SYNC_INTERVAL, remaining))
                return
            except GuestAgentTimeout:
                continue  # not up yet: its answer comes once the agent runs, and the next sync finds it
            except GuestAgentError as err:
                # The agent's socket closes as QEMU exits: a guest that powered off, or a QEMU that died.
                try:
                    self.process.wait(QEMU_EXIT_WAIT)
                except subprocess.TimeoutExpired:
                    raise err from None
                raise self._exited_before_the_agent() from None

    def _exited_before_the_agent(self):
        return DrillFailed("QEMU exited (status %d) before the guest agent answered%s"
                           % (self.process.returncode, self._qemu_said()))

    def _qemu_said(self):
        with open(self.path("qemu.log"), "rb") as stream:
            said = stream.read()[-2000:].decode(errors="replace").strip()
        return ": %s" % said if said else ""

    def _check_filesystems(self, problems):
        """The guest's mounted file systems on disks; their problems go to problems."""
        try:
            found = self.agent.execute("guest-get-fsinfo")
        except GuestAgentCommandError as err:
            problems.append("the guest agent does not list the file systems (%s)" % err.desc)
            return []
        filesystems = [dict(mountpoint=fs.get("mountpoint"), type=fs.get("type"), device=fs.get("name"))
                       for fs in found if fs.get("disk")]
        if not filesystems:
            problems.append("the guest has no file system mounted from a disk")
        log = self._guest_output("dmesg", [])
        if log is not None:
            errors = [line.strip() for line in log.splitlines() if FILESYSTEM_ERRORS.search(line)]
            if errors:
                problems.append("the guest's kernel reported file system or disk errors: %s"
                                % "; ".join(errors[:5]))
        return filesystems

    def _guest_output(self, path, args):
        """stdout of a command in the guest, or None when the guest cannot run it (not a Linux guest)."""
        try:
            result = self.agent.run(path, args)
        except GuestAgentCommandError:
            return None
        return result.stdout.decode(errors="replace") if result.exitcode == 0 else None

    def _run_command(self, command, timeout, problems):
        try:
            result = self.agent.run(command[0], command[1:], timeout=timeout)
        except GuestAgentCommandError as err:
            problems.append("the guest could not run %s: %s" % (command[0], err.desc))
            return dict(argv=command, exitcode=None, signal=None, stdout="", stderr=err.desc)
        except GuestAgentTimeout as err:
            problems.append(str(err))
            return dict(argv=command, exitcode=None, signal=None, stdout="", stderr="")
        outcome = dict(argv=command, exitcode=result.exitcode, signal=result.signal,
                       stdout=result.stdout[-OUTPUT_BYTES:].decode(errors="replace"),
                       stderr=result.stderr[-OUTPUT_BYTES:].decode(errors="replace"))
        if result.exitcode != 0:
            how = "status %s" % result.exitcode if result.signal is None else "signal %s" % result.signal
            said = outcome["stderr"].strip()
            problems.append("%s exited with %s%s" % (" ".join(command), how, ": " + said if said else ""))
        return outcome

    def console_tail(self):
        try:
            with open(self.path("console.log"), "rb") as stream:
                lines = stream.read()[-16384:].decode(errors="replace").replace("\r", "").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if line.strip()][-CONSOLE_LINES:]

    def stop(self):
        """Kill QEMU by its PID and wait for it; close our sockets."""
        if self.agent is not None:
            self.agent.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(QEMU_EXIT_WAIT)
            except subprocess.TimeoutExpired:
                raise UserError("The drill's QEMU (pid %d) did not end when killed: it waits in the kernel, on a "
                                "hung disk or file system. Its directory %s stays until it ends."
                                % (self.process.pid, self.workdir)) from None
        if self.listener is not None:
            self.listener.close()
