"""The SSH fleet with its VMs' repositories on the backup host, which pulls every disk over NBD with TLS.

The collection's fleet_ca playbook makes the certificates over SSH: the CA in the test's directory, a server
certificate for each hypervisor (its loopback address as IP SAN) and the backup host's client certificate, each in
its host's own directory.
"""

FLEET_CA_PLAY = "- name: Certificates\n  ansible.builtin.import_playbook: fleetbackup.qemu.fleet_ca\n"
BACKUP_HOST_DN = "O=fleet,OU=client,CN=backup"


def hypervisors_with_vm_dirs(ssh_fleet, tmp_path):
    """Each hypervisor's own venv and state directory, and its VMs found by their QMP sockets, as a fleet's would."""
    for name in ssh_fleet.hypervisors:
        (tmp_path / name / "state").mkdir(mode=0o700)
        ssh_fleet.hostvars[name].update(qemu_hypervisor_venv=str(tmp_path / name / "venv"),
                                        qemu_hypervisor_state_dir=str(tmp_path / name / "state"),
                                        fleetbackup_qmp_sockets=[str(ssh_fleet.vm_dirs[name] / "*" / "qmp.sock")])


def pull_over_tls(ssh_fleet, tmp_path, repository):
    """Make the fleet's certificates, and put every VM's repository on the backup host, pulled over TLS."""
    for name in ssh_fleet.servers:
        ssh_fleet.hostvars[name]["fleet_ca_tls_dir"] = str(tmp_path / name / "tls")
    rc, _results, output = ssh_fleet.play(FLEET_CA_PLAY, "-e", "fleet_ca_dir=%s" % (tmp_path / "ca"),
                                          "-e", "fleet_ca_organization=fleet")
    assert rc == 0, output[-4000:]
    ssh_fleet.all_vars.update(qemu_backup_repository=str(repository), qemu_backup_repository_host="backup")
    # For the VMs alone (their hypervisors' variables must not refer to hostvars): their hypervisor's address and
    # certificates.
    ssh_fleet.vm_vars.update(
        qemu_backup_tls_certificates=ssh_fleet.hostvars["backup"]["fleet_ca_tls_dir"],
        qemu_backup_nbd_tcp=dict(host="{{ hostvars[fleetbackup_hypervisor].ansible_host }}",
                                 tls_dir="{{ hostvars[fleetbackup_hypervisor].fleet_ca_tls_dir }}",
                                 tls_allow=[BACKUP_HOST_DN]))
