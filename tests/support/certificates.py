"""Certificates for NBD over TLS, made by the collection's fleet_ca playbook on this machine.

The inventory names a hypervisor hv1 reached at 127.0.0.2 (its server certificate's IP SAN), the backup host and an
intruder: a host with a client certificate of the same CA whose name the starts do not allow. A second run with
another CA directory gives certificates that the fleet's CA did not sign.
"""

import json
import os

from support.modules import run_playbook
from support.paths import COLLECTIONS

PLAYBOOK = os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "playbooks", "fleet_ca.yml")
HYPERVISOR_ADDRESS = "127.0.0.2"


class FleetCertificates:
    def __init__(self, directory, organization="fleet"):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.organization = organization
        self.ca_dir = os.path.join(directory, "ca")
        self.inventory = os.path.join(directory, "inventory.json")
        self.runs = 0
        local = {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}
        with open(self.inventory, "w") as stream:
            json.dump({
                "all": {"vars": dict(local, fleet_ca_dir=self.ca_dir, fleet_ca_organization=organization)},
                "hypervisors": {"hosts": {"hv1": {"ansible_host": HYPERVISOR_ADDRESS,
                                                  "fleet_ca_tls_dir": self.tls_dir("hv1")}}},
                "backup_hosts": {"hosts": {name: {"fleet_ca_tls_dir": self.tls_dir(name)}
                                           for name in ("backup", "intruder")}},
            }, stream)

    def tls_dir(self, host):
        return os.path.join(self.directory, host)

    def dn(self, host):
        """The host's distinguished name as QEMU prints it: the subject in its order."""
        return "O=%s,CN=%s" % (self.organization, host)

    def make(self):
        """Run the playbook; (rc, results, output)."""
        self.runs += 1
        return run_playbook(PLAYBOOK, self.inventory, os.path.join(self.directory, "results-%d.json" % self.runs))
