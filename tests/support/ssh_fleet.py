"""A fleet reached over SSH: one sshd of the test's own per host, each on its own loopback address.

Every host ("hypervisors" hv1, hv2, ... and a "backup host") is this machine, seen through an sshd that the test
starts with its own config, host key, pidfile and log in the test's directory, and ends by its PID (its sessions
first). The controller's inventory lists the hosts, not the VMs; Ansible reaches them with the ssh connection
plugin, as root, with a key made for the run, checking their host keys against a known_hosts file made from the
generated keys. Each hypervisor has a directory of VMs: QEMU runs locally, but the modules reach its sockets only
through SSH to that hypervisor's address.
"""

import json
import os
import socket
import subprocess
import threading
import time

from support.modules import ansible_bin, ansible_env, run_playbook
from support.processes import descendants, end_process

SSHD = "/usr/sbin/sshd"
# sshd's privilege separation directory; Debian's service makes it at boot, which a machine without systemd lacks.
PRIVSEP_DIR = "/run/sshd"
# Debian's python on a fresh hypervisor; discovery on this machine would find a pyenv shim without our libraries.
BOOTSTRAP_PYTHON = "/usr/bin/python3"


class SshdError(AssertionError):
    pass


def free_port(address):
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def keygen(path, comment):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True,
                   stdin=subprocess.DEVNULL)


class Sshd:
    """An sshd of our own, in the foreground (-D), logging to a pipe that a thread copies to sshd.log.

    Ready once it logs "Server listening on" (its pidfile comes a moment later: we know its PID from Popen).
    """

    def __init__(self, name, address, directory, client_public_key):
        self.name = name
        self.address = address
        self.port = None
        self.process = None
        self.reader = None
        self.listening = False
        self.log_lines = []
        self.start_seconds = None
        os.makedirs(directory, mode=0o700)
        self.host_key = os.path.join(directory, "ssh_host_ed25519_key")
        keygen(self.host_key, name)
        self.authorized_keys = os.path.join(directory, "authorized_keys")
        with open(client_public_key) as source, open(self.authorized_keys, "w") as target:
            target.write(source.read())
        os.chmod(self.authorized_keys, 0o600)
        self.config = os.path.join(directory, "sshd_config")
        self.pidfile = os.path.join(directory, "sshd.pid")
        self.log = os.path.join(directory, "sshd.log")

    def _write_config(self):
        with open(self.config, "w") as stream:
            stream.write("\n".join([
                "ListenAddress %s:%d" % (self.address, self.port),
                "HostKey %s" % self.host_key,
                "PidFile %s" % self.pidfile,  # not /run/sshd.pid, the system's
                "AuthorizedKeysFile %s" % self.authorized_keys,
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # StrictModes refuses keys under /tmp (mode 1777): "bad ownership or modes for directory /tmp".
                "StrictModes no",
                "Subsystem sftp internal-sftp",
                # Every session on this host says which host it is: the tests check where a module ran.
                "SetEnv FLEETBACKUP_TEST_HOST=%s" % self.name,
                "PrintMotd no",
                "X11Forwarding no",
                "",
            ]))

    def start(self, attempts=5, timeout=30.0):
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        for _attempt in range(attempts):
            # Another process may take the free port before sshd binds it: then sshd exits, and we try another.
            self.port = free_port(self.address)
            self._write_config()
            began = time.monotonic()
            if self._run(timeout):
                self.start_seconds = time.monotonic() - began
                return self
            if not any("Address already in use" in line for line in self.log_lines):
                break
        raise SshdError("sshd %s did not start listening on %s; its log:\n%s"
                        % (self.name, self.address, "".join(self.log_lines[-20:])))

    def _run(self, timeout):
        """Start sshd; True once it listens, False when it exited before (its log says why)."""
        self.log_lines = []
        self.listening = False
        settled = threading.Event()
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", self.config], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # sshd and its sessions write their log to the pipe as long as they run: a thread drains it into sshd.log.
        self.reader = threading.Thread(target=self._follow, args=(self.process.stderr, settled), daemon=True)
        self.reader.start()
        if not settled.wait(timeout):
            self.stop()
            raise SshdError("sshd %s said nothing in %d s" % (self.name, timeout))
        if self.process.poll() is None and self.listening:
            return True
        self.stop()
        return False

    def _follow(self, stream, settled):
        with open(self.log, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                self.log_lines.append(line)
                if line.startswith("Server listening on"):
                    self.listening = True
                    settled.set()
        settled.set()  # end of the pipe: sshd exited

    def stop(self):
        """End its sessions, deepest process first, then sshd itself, each by its PID."""
        if self.process is None:
            return
        for pid in descendants(self.process.pid):
            end_process(pid)
        end_process(self.process.pid)
        self.process.wait()
        self.reader.join(30)
        self.process = None

    def known_hosts_line(self):
        with open(self.host_key + ".pub") as stream:
            key_type, key = stream.read().split()[:2]
        return "[%s]:%d %s %s\n" % (self.address, self.port, key_type, key)

    def accepted_logins(self):
        return [line for line in self.log_lines if line.startswith("Accepted publickey for root from ")]


class SshFleet:
    """Hypervisors hv1..hvN on 127.0.0.2.., a backup host after them, and an inventory that lists them."""

    def __init__(self, tmp_path, hypervisors=2):
        self.tmp_path = tmp_path
        self.directory = tmp_path / "fleet"
        self.directory.mkdir(mode=0o700)
        self.key = str(self.directory / "id_ed25519")
        keygen(self.key, "fleetbackup-test-run")
        self.known_hosts = self.directory / "known_hosts"
        # ssh's control sockets (ControlPersist) in the test's own directory: no master outlives the test's hosts.
        self.control_path_dir = self.directory / "cp"
        self.control_path_dir.mkdir(mode=0o700)
        self.inventory = self.directory / "inventory.json"
        self.servers = {}
        self.hostvars = {}
        self.vm_dirs = {}
        self.runs = 0
        self.all_vars = {}  # more variables for every host, and for hosts that plays add
        self.vm_vars = {}  # variables of the group fleetbackup_vms, the VMs that backup_hypervisors.yml adds
        names = ["hv%d" % number for number in range(1, hypervisors + 1)] + ["backup"]
        for number, name in enumerate(names, start=2):
            host_dir = tmp_path / name
            host_dir.mkdir()
            self.servers[name] = Sshd(name, "127.0.0.%d" % number, str(host_dir / "sshd"), self.key + ".pub")
            self.hostvars[name] = {}
            if name != "backup":
                self.vm_dirs[name] = host_dir / "vms"
                self.vm_dirs[name].mkdir()

    @property
    def hypervisors(self):
        return [name for name in self.servers if name != "backup"]

    def start(self):
        for server in self.servers.values():
            server.start()
        self.known_hosts.write_text("".join(server.known_hosts_line() for server in self.servers.values()))
        return self

    def stop(self):
        for server in self.servers.values():
            server.stop()

    def write_inventory(self):
        def host(name):
            server = self.servers[name]
            return dict(self.hostvars[name], ansible_host=server.address, ansible_port=server.port)

        self.inventory.write_text(json.dumps({
            "all": {"vars": dict(self.all_vars, **{
                "ansible_connection": "ssh",
                "ansible_user": "root",
                "ansible_ssh_private_key_file": self.key,
                "ansible_ssh_common_args": "-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes "
                                           "-o IdentitiesOnly=yes" % self.known_hosts,
                "ansible_control_path_dir": str(self.control_path_dir),
                "ansible_python_interpreter": BOOTSTRAP_PYTHON,
                "fleetbackup_report_dir": str(self.directory / "reports"),  # the run report's, on the controller
            })},
            "hypervisors": {"hosts": {name: host(name) for name in self.hypervisors}},
            "backup_hosts": {"hosts": {"backup": host("backup")}},
            "fleetbackup_vms": {"vars": self.vm_vars},
        }, indent=1))
        return str(self.inventory)

    def play(self, playbook_text, *args, forks=5):
        """ansible-playbook of a playbook given as YAML text, over SSH; (rc, results, output) as run_playbook's."""
        self.runs += 1
        playbook = self.directory / ("play-%d.yml" % self.runs)
        playbook.write_text(playbook_text)
        return run_playbook(str(playbook), self.write_inventory(), str(self.directory / ("results-%d.json" % self.runs)),
                            forks=forks, more_args=args)

    def adhoc(self, pattern, module, module_args=""):
        """`ansible -i INVENTORY pattern -m module -a module_args`; (rc, {host: result}, output)."""
        self.runs += 1
        tree = self.directory / ("tree-%d" % self.runs)
        command = [ansible_bin("ansible"), "-i", self.write_inventory(), pattern, "-m", module, "-t", str(tree)]
        if module_args:
            command += ["-a", module_args]
        process = subprocess.run(command, env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=300, check=False)
        results = {name: json.loads((tree / name).read_text()) for name in os.listdir(tree)} if tree.exists() else {}
        return process.returncode, results, process.stdout.decode(errors="replace")
