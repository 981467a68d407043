"""Certificates for NBD over TLS, made by the collection's fleet_ca playbook on this machine.

The inventory names a hypervisor hv1 reached at 127.0.0.2 (its server certificate's IP SAN), the backup host and an
intruder: a host with a client certificate of the same CA whose name the starts do not allow. A second run with
another CA directory gives certificates that the fleet's CA did not sign.

sign_requests runs the CA's side alone (the playbook's tasks/fleet_ca_sign.yml) on requests made here, as a
compromised host could send them.
"""

import json
import os

from support.modules import run_playbook
from support.paths import COLLECTIONS

TASKS = os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "playbooks", "tasks")
PLAYBOOK = os.path.join(os.path.dirname(TASKS), "fleet_ca.yml")
HYPERVISOR_ADDRESS = "127.0.0.2"
LOCAL = {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}

# The CA's side for hosts that bring their own request (hostvars csr_file, role): what the playbook fixes for the
# host, then the check, the signing and the certificate's installation, as the playbook runs them.
SIGN_PLAY = """
- name: Sign requests made elsewhere
  hosts: all
  gather_facts: false
  tasks:
    - name: Fix what the CA will sign for this host
      ansible.builtin.include_tasks: %(tasks)s/fleet_ca_expect.yml
      vars:
        __fleet_ca_role: "{{ role }}"
    - name: Have the CA check the request and sign it
      ansible.builtin.include_tasks: %(tasks)s/fleet_ca_sign.yml
      vars:
        __fleet_ca_role: "{{ role }}"
        __fleet_ca_csr: "{{ lookup('ansible.builtin.file', csr_file) }}"
        __fleet_ca_current_certificate: ""
"""


class FleetCertificates:
    def __init__(self, directory, organization="fleet", all_vars=None, hypervisors=None):
        """all_vars: more variables for every host; hypervisors: {name: variables} instead of hv1's."""
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.organization = organization
        self.ca_dir = os.path.join(directory, "ca")
        self.inventory = os.path.join(directory, "inventory.json")
        self.runs = 0
        self.hypervisors = hypervisors or {"hv1": {"ansible_host": HYPERVISOR_ADDRESS}}
        self.all_vars = dict(LOCAL, fleet_ca_dir=self.ca_dir, fleet_ca_organization=organization, **(all_vars or {}))
        with open(self.inventory, "w") as stream:
            json.dump({
                "all": {"vars": self.all_vars},
                "hypervisors": {"hosts": {name: dict(hostvars, fleet_ca_tls_dir=self.tls_dir(name))
                                          for name, hostvars in self.hypervisors.items()}},
                "backup_hosts": {"hosts": {name: {"fleet_ca_tls_dir": self.tls_dir(name)}
                                           for name in ("backup", "intruder")}},
            }, stream)

    def tls_dir(self, host):
        return os.path.join(self.directory, host)

    def dn(self, host, role=None):
        """The host's distinguished name as QEMU prints it: the subject in its order; a hypervisor's is a server's."""
        role = role or ("server" if host in self.hypervisors else "client")
        return "O=%s,OU=%s,CN=%s" % (self.organization, role, host)

    def sign_requests(self, hosts, name="sign"):
        """Hand the CA requests made elsewhere: hosts is {name: variables with csr_file and role (and ansible_host,
        fleet_ca_addresses...)}; each host's certificate lands in tls_dir(name). (rc, results, output)."""
        directory = os.path.join(self.directory, name)
        os.makedirs(directory)
        inventory, playbook = os.path.join(directory, "inventory.json"), os.path.join(directory, "sign.yml")
        with open(inventory, "w") as stream:
            json.dump({"all": {"vars": self.all_vars, "hosts": {
                host: dict(hostvars, fleet_ca_tls_dir=self.tls_dir(host)) for host, hostvars in hosts.items()}}}, stream)
        with open(playbook, "w") as stream:
            stream.write(SIGN_PLAY % dict(tasks=TASKS))
        return run_playbook(playbook, inventory, os.path.join(directory, "results.json"))

    def make(self, extra_vars=None):
        """Run the playbook; (rc, results, output)."""
        self.runs += 1
        return run_playbook(PLAYBOOK, self.inventory, os.path.join(self.directory, "results-%d.json" % self.runs),
                            extra_vars=extra_vars)
