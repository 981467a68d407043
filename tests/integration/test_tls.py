"""Backups pulled over NBD on TCP with TLS: real QEMU servers, real TLS, certificates from the fleet_ca playbook."""

import datetime
import ipaddress
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

import nbd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from qemu.qmp import ExecuteError

from support.certificates import HYPERVISOR_ADDRESS, FleetCertificates
from support.fleet import assert_ok
from support.fleet_tls import hypervisors_with_vm_dirs, pull_over_tls
from support.flows import Backups, assert_servers_gone, offline_record
from support.modules import run_module
from support.qemu_vm import DiskSpec, MiB, same

ALLOWED = "backup"
REFUSED = "refused: "


def tls_start(flow, fleet, backup_id="b1", **args):
    tcp = dict(host=HYPERVISOR_ADDRESS, tls_dir=fleet.tls_dir("hv1"), tls_allow=[fleet.dn(ALLOWED)])
    tcp.update(args.pop("tcp", {}))
    return flow.start(backup_id, nbd_tcp=tcp, **args)


def connect(url, certificates=None):
    """A libnbd client of our own: the export's first 4 KiB, or REFUSED and why."""
    handle = nbd.NBD()
    handle.set_uri_allow_local_file(True)
    if certificates:
        handle.set_tls_certificates(certificates)
    try:
        handle.connect_uri(url)
        data = handle.pread(4096, 0)
        handle.shutdown()
        return data
    except nbd.Error as err:
        return REFUSED + str(err)


def listening(port):
    with socket.socket() as probe:
        return probe.connect_ex((HYPERVISOR_ADDRESS, port)) == 0


def fb_objects(vm):
    return sorted(o["name"] for o in vm.qmp("qom-list", path="/objects") if o["name"].startswith("fb-"))


def test_the_fleet_ca_playbook_makes_private_keys_and_ip_sans_and_a_rerun_changes_nothing(fleet_certificates):
    fleet, _other = fleet_certificates
    assert fleet.first_run["stats"]["hv1"]["changed"] and fleet.first_run["stats"]["backup"]["changed"]
    for host, role in (("hv1", "server"), ("backup", "client"), ("intruder", "client")):
        directory = fleet.tls_dir(host)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(directory, "%s-key.pem" % role)).st_mode) == 0o600
        assert sorted(os.listdir(directory)) == ["ca-cert.pem", "%s-cert.pem" % role, "%s-key.pem" % role]
    assert stat.S_IMODE(os.stat(os.path.join(fleet.ca_dir, "ca-key.pem")).st_mode) == 0o600
    server_certificate = os.path.join(fleet.tls_dir("hv1"), "server-cert.pem")
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", server_certificate], check=True,
                          stdout=subprocess.PIPE, text=True).stdout
    assert "IP Address:%s" % HYPERVISOR_ADDRESS in text and "TLS Web Server Authentication" in text
    subprocess.run(["openssl", "verify", "-CAfile", os.path.join(fleet.ca_dir, "ca-cert.pem"),
                    os.path.join(fleet.tls_dir("backup"), "client-cert.pem")], check=True, stdout=subprocess.DEVNULL)
    for host, role in (("hv1", "server"), ("backup", "client")):
        subject = certificate(os.path.join(fleet.tls_dir(host), "%s-cert.pem" % role)).subject.rfc4514_string()
        assert subject == "CN=%s,OU=%s,O=fleet" % (host, role)  # RFC 4514 lists it backwards
        assert fleet.dn(host) == "O=fleet,OU=%s,CN=%s" % (role, host)
        with open(os.path.join(fleet.tls_dir(host), "ca-cert.pem")) as installed, \
                open(os.path.join(fleet.ca_dir, "ca-cert.pem")) as ca:
            assert installed.read() == ca.read()
    ca_constraints = certificate(os.path.join(fleet.ca_dir, "ca-cert.pem")).extensions.get_extension_for_class(
        x509.BasicConstraints)
    assert ca_constraints.critical and ca_constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    rc, again, output = fleet.make()
    assert rc == 0 and {host: stats["changed"] for host, stats in again["stats"].items()} == dict(
        localhost=0, hv1=0, backup=0, intruder=0), output[-3000:]


def certificate(path):
    with open(path, "rb") as stream:
        return x509.load_pem_x509_certificate(stream.read())


def request(path, name, role="client", ips=(), ca=False, usages=None, organization="fleet", more=()):
    """A certificate request as a compromised host could send it, by default the one the CA expects of a client."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usages = usages or [ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if ips:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=ca)
    builder = builder.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not ca, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
    builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    for extension in more:
        builder = builder.add_extension(extension, critical=False)
    with open(path, "wb") as stream:
        stream.write(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def test_the_fleet_ca_refuses_a_request_for_another_name_or_a_ca_or_more_than_the_hosts_role(
        tmp_path, fleet_certificates):
    """The CA's side of the playbook (tasks/fleet_ca_sign.yml), with the fleet's CA, on requests a compromised host
    could send: only the honest ones are signed."""
    fleet, _other = fleet_certificates
    ip = "127.0.0.9"
    hosts = {
        # The requests the playbook itself would make: signed (the check refuses nothing it should sign).
        "honest-client": dict(role="client", csr=dict(name="honest-client")),
        "honest-server": dict(role="server", ansible_host=ip, csr=dict(name="honest-server", role="server", ips=[ip])),
        # The backup host's name, in every hypervisor's tls_allow.
        "wants-backup": dict(role="client", csr=dict(name="backup")),
        # A server certificate where the host is a client (a hypervisor's tls_allow could not tell them apart).
        "wants-server": dict(role="client", csr=dict(name="wants-server", role="server")),
        # A CA of its own, under the fleet's CA.
        "wants-ca": dict(role="client", csr=dict(name="wants-ca", ca=True)),
        # Another address, or another use, or an extension the CA would copy.
        "wants-address": dict(role="server", ansible_host=ip,
                              csr=dict(name="wants-address", role="server", ips=[ip, "10.9.9.9"])),
        "wants-both": dict(role="server", ansible_host=ip, csr=dict(
            name="wants-both", role="server", ips=[ip],
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])),
        "wants-more": dict(role="client", csr=dict(name="wants-more", more=[x509.NameConstraints(
            permitted_subtrees=[x509.DNSName("example.org")], excluded_subtrees=None)])),
    }
    inventory = {}
    for host, spec in hosts.items():
        os.makedirs(fleet.tls_dir(host), mode=0o700, exist_ok=True)
        csr_file = request(str(tmp_path / ("%s.csr" % host)), **spec.pop("csr"))
        inventory[host] = dict(spec, csr_file=csr_file)
    rc, results, output = fleet.sign_requests(inventory)
    assert rc != 0
    assert sorted(results["failures"]) == sorted(h for h in hosts if h.startswith("wants-")), output[-4000:]
    for host in ("honest-client", "honest-server"):
        role = inventory[host]["role"]
        issued = os.path.join(fleet.tls_dir(host), "%s-cert.pem" % role)
        subprocess.run(["openssl", "verify", "-CAfile", os.path.join(fleet.ca_dir, "ca-cert.pem"), issued],
                       check=True, stdout=subprocess.DEVNULL)
        assert certificate(issued).subject.rfc4514_string() == "CN=%s,OU=%s,O=fleet" % (host, role)
    for host in hosts:
        if host.startswith("wants-"):
            assert os.listdir(fleet.tls_dir(host)) == [], host  # no certificate
    failures = {host: " ".join(messages) for host, messages in results["failures"].items()}
    for host, message in failures.items():
        assert "The CA refuses to sign the certificate request of %s" % host in message, message
        assert "it gets no certificate" in message
    assert '[["organizationName", "fleet"], ["organizationalUnitName", "client"], ["commonName", "backup"]]' in \
        failures["wants-backup"]
    assert "subject is" in failures["wants-server"] and "TLS Web Server Authentication" in failures["wants-server"]
    assert 'basic_constraints is ["CA:TRUE", "pathlen:0"], not ["CA:FALSE"]' in failures["wants-ca"]
    assert "Certificate Sign" in failures["wants-ca"]
    assert 'subject_alt_name is ["IP:127.0.0.9", "IP:10.9.9.9"], not ["IP:127.0.0.9"]' in failures["wants-address"]
    assert "extended_key_usage is" in failures["wants-both"] and "subject is" not in failures["wants-both"]
    assert "extensions is" in failures["wants-more"] and "2.5.29.30" in failures["wants-more"]


def test_a_hypervisor_named_by_dns_gets_no_certificate_and_is_told_to_give_its_ip_addresses(tmp_path):
    fleet = FleetCertificates(str(tmp_path), hypervisors={
        "hv1": {"ansible_host": HYPERVISOR_ADDRESS}, "hv2": {"ansible_host": "hv2.example"},
        "hv3": {"fleet_ca_addresses": ["192.0.2.3", "2001:db8::3", "hv3.example"]}})
    rc, results, output = fleet.make()
    assert rc != 0 and sorted(results["failures"]) == ["hv2", "hv3"], output[-4000:]
    assert ("hv2: its server certificate names the IP addresses that the copies connect to, and hv2.example is not "
            "an IP address (its ansible_host). Set fleet_ca_addresses") in results["failures"]["hv2"][0]
    assert "hv3.example is not an IP address (fleet_ca_addresses)" in results["failures"]["hv3"][0]
    assert not os.path.exists(fleet.tls_dir("hv2")) and not os.path.exists(fleet.tls_dir("hv3"))  # nothing done
    assert os.path.exists(os.path.join(fleet.tls_dir("hv1"), "server-cert.pem"))


def test_a_rerun_renews_certificates_that_expire_within_fleet_ca_renew_days(tmp_path):
    fleet = FleetCertificates(str(tmp_path))
    first = assert_ok(fleet.make(extra_vars=dict(fleet_ca_days=10, fleet_ca_ca_days=20)))
    assert first["stats"]["hv1"]["changed"]
    paths = dict(ca=os.path.join(fleet.ca_dir, "ca-cert.pem"),
                 hv1=os.path.join(fleet.tls_dir("hv1"), "server-cert.pem"),
                 backup=os.path.join(fleet.tls_dir("backup"), "client-cert.pem"))
    before = {name: certificate(path) for name, path in paths.items()}
    now = datetime.datetime.now(datetime.timezone.utc)
    assert all(c.not_valid_after_utc < now + datetime.timedelta(days=21) for c in before.values())
    # Within 30 days of their end: the CA's certificate (with its key) and every host's are signed anew.
    again = assert_ok(fleet.make())
    assert all(stats["changed"] for stats in again["stats"].values()), again["stats"]
    after = {name: certificate(path) for name, path in paths.items()}
    assert after["ca"].not_valid_after_utc > now + datetime.timedelta(days=3000)
    assert after["hv1"].not_valid_after_utc > now + datetime.timedelta(days=360)
    assert after["backup"].not_valid_after_utc > now + datetime.timedelta(days=360)
    assert after["ca"].public_key() == before["ca"].public_key()
    assert after["hv1"].public_key() == before["hv1"].public_key()  # the key stays; only the certificate is new
    for name in ("hv1", "backup"):
        subprocess.run(["openssl", "verify", "-CAfile", os.path.join(fleet.tls_dir(name), "ca-cert.pem"),
                        paths[name]], check=True, stdout=subprocess.DEVNULL)
    # Long enough: a third run changes nothing.
    assert_ok(fleet.make(), changed=dict(localhost=0, hv1=0, backup=0, intruder=0))


def test_a_backup_pulled_over_tls_restores_exactly_and_its_listener_goes_with_the_stop(
        vms, tmp_path, fleet_certificates):
    fleet, _other = fleet_certificates

    def prepare(vm):
        vm.write("vda", 0, 4 * MiB, 0x61)
        vm.write("vdb", 8 * MiB, 2 * MiB, 0x62)

    # QEMU runs as nobody: it reads the credentials, which only root can read where they live, through our copy.
    vm = vms([DiskSpec("vda"), DiskSpec("vdb", format="raw")], prepare=prepare, runas="nobody")
    flow = Backups(vm, str(tmp_path))
    at_start = {d: vm.mark(d) for d in vm.disks}
    started = tls_start(flow, fleet, checkpoint="c1", fallback_to_full=True)
    assert not started.failed, started["msg"]
    backup = started["backup"]
    port = backup["nbd_tcp"]["port"]
    assert backup["nbd_tcp"] == dict(host=HYPERVISOR_ADDRESS, port=port, tls=True) and port > 0
    assert backup["nbd_socket"] is None
    assert [d["url"] for d in backup["disks"]] == ["nbds://%s:%d/%s" % (HYPERVISOR_ADDRESS, port, d["export"])
                                                   for d in backup["disks"]]
    assert fb_objects(vm) == ["fb-b1-authz", "fb-b1-tls"]
    assert vm.qmp("query-fdsets") and all(  # only the scratch images: the credentials' directory went at once
        "fleetbackup-tls" not in (fd.get("opaque") or "") for fdset in vm.qmp("query-fdsets") for fd in fdset["fds"])
    assert flow.vm_state_files() == ["backup.json"]  # no socket, and no copy of the credentials
    vm.write("vda", 0, MiB, 0x71)  # after the point in time: not in this backup
    copies = flow.copy_all(backup, str(tmp_path), "b1", tls_certificates=fleet.tls_dir(ALLOWED))
    assert copies["vda"]["bytes_read"] == 4 * MiB  # only data, over TLS as over the unix socket
    for disk in vm.disks:
        image = str(tmp_path / ("b1.%s.qcow2" % disk))
        assert same(image, vm.expected_image(disk, at_start[disk], image + ".expected"))

    assert flow.stop("b1", check_mode=True)["intact"] is None  # reading the probes would end the TCP server
    assert listening(port)
    stopped = flow.stop("b1")
    assert stopped["changed"] is True and stopped["intact"] is True
    assert stopped["removed"]["objects"] == ["fb-b1-authz", "fb-b1-tls"] and stopped["removed"]["nbd_server"]
    assert not listening(port)
    with pytest.raises(ExecuteError, match="NBD server not running"):
        vm.qmp("nbd-server-stop")
    assert connect(backup["disks"][0]["url"], fleet.tls_dir(ALLOWED)).startswith(REFUSED + "nbd_connect_uri: connect")
    assert fb_objects(vm) == []
    flow.assert_nothing_left()

    # The chain goes on over TLS: an incremental reads only what changed, and restores exactly.
    at_second = {d: vm.mark(d) for d in vm.disks}
    inc = tls_start(flow, fleet, "b2", incremental="c1", checkpoint="c2", fallback_to_full=True)["backup"]
    assert inc["disks"][0]["mode"] == "incremental"
    copies = flow.copy_all(inc, str(tmp_path), "b2", previous_prefix="b1", tls_certificates=fleet.tls_dir(ALLOWED))
    assert copies["vda"]["bytes_read"] == MiB
    for disk in vm.disks:
        image = str(tmp_path / ("b2.%s.qcow2" % disk))
        assert same(image, vm.expected_image(disk, at_second[disk], image + ".expected"))
    assert flow.stop("b2", discard_checkpoint=True)["changed"] is True
    vm.qmp("block-dirty-bitmap-remove", node=vm.node("vda"), name="c1")
    flow.assert_nothing_left()


def test_the_stop_of_a_tcp_backup_still_tells_whether_the_point_in_time_held(vms, tmp_path, fleet_certificates):
    """Only the backup host may read the probes over TLS: the stop reads them on a unix socket of its own."""
    fleet, _other = fleet_certificates
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, 8 * MiB, 0x21))
    flow = Backups(vm, str(tmp_path))
    port = tls_start(flow, fleet, scratch_size="1M")["backup"]["nbd_tcp"]["port"]
    vm.write("vda", 0, 8 * MiB, 0x22)  # 8 MiB of old data to keep in 1 MiB: the view breaks, the guest's writes land
    stopped = flow.stop("b1")
    assert stopped["intact"] is False and not listening(port)
    assert stopped["removed"]["objects"] == ["fb-b1-authz", "fb-b1-tls"]
    assert vm.status() == "running"
    flow.assert_nothing_left()


def test_qemu_refuses_clients_without_the_fleet_ca_or_the_allowed_name(vms, tmp_path, fleet_certificates):
    fleet, other = fleet_certificates
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x55))
    flow = Backups(vm, str(tmp_path))
    disk = tls_start(flow, fleet)["backup"]["disks"][0]
    url = disk["url"]
    # Without TLS: QEMU serves TLS only.
    plain = connect(url.replace("nbds://", "nbd://"))
    assert plain.startswith(REFUSED) and "server requires TLS" in plain
    # Without a client certificate (the fleet's CA to check the server with, nothing to show).
    no_certificate = tmp_path / "no-client-certificate"
    no_certificate.mkdir(mode=0o700)
    shutil.copy(os.path.join(fleet.tls_dir(ALLOWED), "ca-cert.pem"), str(no_certificate))
    refused = connect(url, str(no_certificate))
    assert refused.startswith(REFUSED) and "Verify failed: No certificate was found" in vm.messages()
    # A certificate of another CA, even with the allowed name: the server checks the client against the fleet's CA.
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    shutil.copy(os.path.join(fleet.tls_dir(ALLOWED), "ca-cert.pem"), str(foreign))
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(os.path.join(other.tls_dir(ALLOWED), name), str(foreign / name))
    assert other.dn(ALLOWED) == fleet.dn(ALLOWED)
    refused = connect(url, str(foreign))
    assert refused.startswith(REFUSED) and "The certificate hasn't got a known issuer" in vm.messages()
    # The fleet's CA, another name: tls-authz refuses it.
    refused = connect(url, fleet.tls_dir("intruder"))
    assert refused.startswith(REFUSED)
    assert "TLS x509 authz check for %s is denied" % fleet.dn("intruder") in vm.messages()
    # And through the copy module: a clear failure, and no image.
    dest = tmp_path / "intruder.qcow2"
    failed = run_module("qemu_backup_copy", src=url, dest=str(dest), tls_certificates=fleet.tls_dir("intruder"))
    assert failed.failed and "nbd_tcp.tls_allow" in failed["msg"] and "Cannot connect to NBD export" in failed["msg"]
    assert os.listdir(str(tmp_path)).count("intruder.qcow2") == 0
    # A client that trusts another CA refuses this server in turn.
    assert "certificate verification" in connect(url, other.tls_dir(ALLOWED))
    # The same server admits the backup host: the refusals above are the certificates' doing.
    assert connect(url, fleet.tls_dir(ALLOWED)) == b"\x55" * 4096
    assert "authz check for %s is denied" % fleet.dn(ALLOWED) not in vm.messages()
    flow.stop("b1")
    flow.assert_nothing_left()


def test_a_stopped_vms_disks_are_pulled_over_tls_each_from_a_qemu_nbd_of_its_own(vms, tmp_path, fleet_certificates):
    fleet, _other = fleet_certificates

    def prepare(vm):
        vm.write("vda", 0, 2 * MiB, 0x81)
        vm.write("vdb", MiB, MiB, 0x82)

    vm = vms([DiskSpec("vda"), DiskSpec("vdb", size=16 * MiB)], prepare=prepare)
    flow = Backups(vm, str(tmp_path))
    flow.info()  # fleetbackup sees the VM's disks while it runs
    vm.quit()
    fixed = tls_start(flow, fleet, tcp=dict(port=10809))
    assert fixed.failed and "give nbd_tcp.port 0" in fixed["msg"] and flow.vm_state_files() == []

    started = tls_start(flow, fleet, checkpoint="c1")
    assert not started.failed, started["msg"]
    backup = started["backup"]
    assert backup["offline"] is True and backup["nbd_tcp"] == dict(host=HYPERVISOR_ADDRESS, port=None, tls=True)
    ports = [int(re.match(r"nbds://%s:(\d+)/" % re.escape(HYPERVISOR_ADDRESS), d["url"]).group(1))
             for d in backup["disks"]]
    assert len(set(ports)) == 2 and all(listening(port) for port in ports)
    assert flow.vm_state_files() == ["backup.json"]  # the credentials' copies went once qemu-nbd had loaded them
    url = backup["disks"][0]["url"]
    assert "server requires TLS" in connect(url.replace("nbds://", "nbd://"))
    assert connect(url, fleet.tls_dir("intruder")).startswith(REFUSED)
    assert connect(url, fleet.tls_dir(ALLOWED)) == b"\x81" * 4096
    copies = flow.copy_all(backup, str(tmp_path), "b1", tls_certificates=fleet.tls_dir(ALLOWED))
    assert copies["vda"]["bytes_read"] == 2 * MiB and copies["vdb"]["bytes_read"] == MiB
    for disk in vm.disks:
        image = str(tmp_path / ("b1.%s.qcow2" % disk))
        assert same(image, vm.expected_image(disk, vm.mark(disk), image + ".expected"))
    record = offline_record(flow)
    stopped = flow.stop("b1")
    assert stopped["changed"] is True and stopped["intact"] is True, stopped
    assert_servers_gone(record)
    assert not any(listening(port) for port in ports) and flow.vm_state_files() == []


def test_plain_tcp_only_by_choice_and_on_loopback(vms, tmp_path):
    vm = vms([DiskSpec("vda")], prepare=lambda vm: vm.write("vda", 0, MiB, 0x44))
    flow = Backups(vm, str(tmp_path))
    refused = flow.start("b1", nbd_tcp=dict(host="192.0.2.1", plain=True))
    assert refused.failed and "Plain TCP (nbd_tcp.plain) is refused on 192.0.2.1" in refused["msg"]
    started = flow.start("b1", nbd_tcp=dict(host="127.0.0.1", plain=True))["backup"]
    disk = started["disks"][0]
    assert disk["url"].startswith("nbd://127.0.0.1:") and started["nbd_tcp"]["tls"] is False
    assert fb_objects(vm) == []
    dest = str(tmp_path / "plain.qcow2")
    assert run_module("qemu_backup_copy", src=disk["url"], dest=dest)["changed"] is True
    assert same(dest, vm.flushed_image("vda"))
    assert flow.stop("b1")["removed"]["objects"] == []
    flow.assert_nothing_left()


def test_bad_tcp_input_fails_clearly_and_leaves_nothing(vms, tmp_path, fleet_certificates):
    fleet, _other = fleet_certificates
    vm = vms([DiskSpec("vda")])
    flow = Backups(vm, str(tmp_path))
    broken = tmp_path / "broken-tls"
    broken.mkdir(mode=0o700)
    for name in ("ca-cert.pem", "server-cert.pem"):
        shutil.copy(os.path.join(fleet.tls_dir("hv1"), name), str(broken))
    open_key = tmp_path / "open-key"
    shutil.copytree(fleet.tls_dir("hv1"), str(open_key))
    os.chmod(str(open_key / "server-key.pem"), 0o644)
    taken = socket.socket()
    taken.bind((HYPERVISOR_ADDRESS, 0))
    taken.listen(1)
    cases = [
        (dict(tcp=dict(tls_dir=str(tmp_path / "missing"))), "does not exist"),
        (dict(tcp=dict(tls_dir=str(broken))), "lacks server-key.pem"),
        (dict(tcp=dict(tls_dir=str(open_key))), "can be read by others (mode 644): chmod 0600 it"),
        (dict(tcp=dict(tls_allow=[])), "nbd_tcp.tls_allow is empty"),
        (dict(tcp=dict(tls_dir=None)), "nbd_tcp needs tls_dir"),
        (dict(tcp=dict(host="localhost")), "nbd_tcp.host 'localhost' is not an IP address"),
        (dict(tcp=dict(host="0.0.0.0")), "listens on every address"),
        (dict(tcp=dict(port=taken.getsockname()[1])), "cannot listen on %s port %d (Address already in use)"
         % (HYPERVISOR_ADDRESS, taken.getsockname()[1])),
        (dict(nbd_socket=str(tmp_path / "x.sock")), "parameters are mutually exclusive: nbd_socket|nbd_tcp"),
    ]
    try:
        for args, message in cases:
            result = tls_start(flow, fleet, **args)
            assert result.failed and message in result["msg"], (args, result["msg"])
            flow.assert_nothing_left()
    finally:
        taken.close()

    # Check mode plans the TCP backup and creates nothing: no listener, no object.
    planned = tls_start(flow, fleet, check_mode=True)
    assert planned["changed"] is True and planned["backup"]["nbd_tcp"]["port"] == 0
    flow.assert_nothing_left()

    # The copy's side: certificates go with nbds:// only, and nbds:// needs them.
    unix_disk = flow.start("b2")["backup"]["disks"][0]
    dest = str(tmp_path / "x.qcow2")
    for args, message in [
        (dict(src=unix_disk["url"], tls_certificates=fleet.tls_dir(ALLOWED)), "tls_certificates is for an nbds://"),
        (dict(src="nbds://%s:1/x" % HYPERVISOR_ADDRESS), "give tls_certificates"),
        (dict(src="nbds://%s:1/x" % HYPERVISOR_ADDRESS, tls_certificates=str(tmp_path / "none")), "does not exist"),
        (dict(src="nbds://%s:1/x" % HYPERVISOR_ADDRESS, tls_certificates=fleet.tls_dir("hv1")),
         "lacks client-cert.pem"),
    ]:
        result = run_module("qemu_backup_copy", dest=dest, **args)
        assert result.failed and message in result["msg"], (args, result["msg"])
    assert not os.path.exists(dest)
    flow.stop("b2")
    flow.assert_nothing_left()


def test_nothing_is_left_when_the_start_fails_after_the_tls_objects(vms, tmp_path, fleet_certificates):
    """A start whose NBD server cannot start (one is running already) rolls back its credentials and filter too."""
    fleet, _other = fleet_certificates
    vm = vms([DiskSpec("vda")])
    flow = Backups(vm, str(tmp_path))
    vm.qmp("nbd-server-start", addr=dict(type="unix", data=dict(path=str(tmp_path / "theirs.sock"))))
    failed = tls_start(flow, fleet)
    assert failed.failed and "starting the NBD server failed" in failed["msg"]
    assert "Everything it had created was removed" in failed["msg"]
    vm.qmp("nbd-server-stop")
    flow.assert_nothing_left()


FLEET_TLS_PLAY = """
- name: Make the fleet's CA and certificates
  ansible.builtin.import_playbook: fleetbackup.qemu.fleet_ca

- name: Back up a VM of hv1 into the backup host's repository, pulled over TLS
  hosts: hv1
  gather_facts: false
  tasks:
    - name: Freeze the VM and export it over TLS to the backup host alone
      fleetbackup.qemu.qemu_backup_start:
        qmp_socket: "{{ vm_qmp_socket }}"
        state_dir: "{{ vm_state_dir }}"
        scratch_dir: "{{ vm_scratch_dir }}"
        backup_id: fleet1
        nbd_tcp:
          host: "{{ ansible_host }}"
          tls_dir: "{{ fleet_ca_tls_dir }}"
          tls_allow: ["{{ hostvars['backup'].fleet_ca_dn }}"]
      register: started

    - name: Copy each disk on the backup host
      fleetbackup.qemu.qemu_backup_copy:
        src: "{{ item.url }}"
        tls_certificates: "{{ hostvars['backup'].fleet_ca_tls_dir }}"
        dest: "{{ repository }}/{{ item.disk }}.qcow2"
      loop: "{{ started.backup.disks }}"
      delegate_to: backup

    - name: End the backup
      fleetbackup.qemu.qemu_backup_stop:
        qmp_socket: "{{ vm_qmp_socket }}"
        state_dir: "{{ vm_state_dir }}"
        backup_id: fleet1
"""


def test_the_backup_host_pulls_a_hypervisors_vm_over_tls_through_ssh(ssh_fleet, vms, tmp_path):
    from test_ssh_fleet import ran_over_ssh

    vm = vms([DiskSpec("vda")], under=ssh_fleet.vm_dirs["hv1"], prepare=lambda vm: vm.write("vda", 0, 2 * MiB, 0x77))
    repository = tmp_path / "backup" / "repository"
    repository.mkdir()
    hv1 = ssh_fleet.hostvars["hv1"]
    hv1.update(fleet_ca_tls_dir=str(tmp_path / "hv1" / "tls"), vm_qmp_socket=vm.qmp_socket,
               vm_state_dir=str(tmp_path / "hv1" / "state"), vm_scratch_dir=str(tmp_path / "hv1" / "scratch"),
               repository=str(repository),
               ansible_python_interpreter=sys.executable)  # qemu.qmp: what the hypervisor role would give it
    os.makedirs(hv1["vm_scratch_dir"], mode=0o700)
    ssh_fleet.hostvars["backup"].update(fleet_ca_tls_dir=str(tmp_path / "backup" / "tls"))
    rc, results, output = ssh_fleet.play(FLEET_TLS_PLAY, "-vvv", "-e", "fleet_ca_dir=%s" % (tmp_path / "ca"),
                                         "-e", "fleet_ca_organization=fleet")
    assert rc == 0 and not results["failures"], output[-5000:]
    copies = results["tasks"]["hv1"]["Copy each disk on the backup host"]["results"]
    assert [copy["item"]["url"].split("/")[2] for copy in copies] == [
        "%s:%d" % (ssh_fleet.servers["hv1"].address, results["tasks"]["hv1"][
            "Freeze the VM and export it over TLS to the backup host alone"]["backup"]["nbd_tcp"]["port"])]
    assert ran_over_ssh(output, ssh_fleet.servers["backup"], "qemu_backup_copy")
    assert ran_over_ssh(output, ssh_fleet.servers["hv1"], "qemu_backup_start")
    assert same(str(repository / "vda.qcow2"), vm.flushed_image("vda"))
    stopped = results["tasks"]["hv1"]["End the backup"]
    assert stopped["removed"]["objects"] == ["fb-fleet1-authz", "fb-fleet1-tls"]
    assert Backups(vm, str(tmp_path / "hv1")).vm_state_files() == []
    assert fb_objects(vm) == [] and vm.qmp("query-block-exports") == []


def test_the_fleet_playbook_keeps_every_repository_on_the_backup_host_pulled_over_tls(ssh_fleet, vms, tmp_path):
    """backup_hypervisors.yml with a backup host: two running VMs on each hypervisor, a stopped one and one that
    fails; each hypervisor exports over TLS (the stopped VM through qemu-nbd), the backup host copies and keeps the
    repositories; full (the stopped VM offline), then it runs again and every chain goes on incremental (its own
    online); every point restores exactly; nothing is left on the hypervisors."""
    from test_fleet import line_of, manifest, restores, run_fleet

    repository = tmp_path / "backup" / "repository"
    repository.mkdir(mode=0o700)
    hypervisors_with_vm_dirs(ssh_fleet, tmp_path)
    pull_over_tls(ssh_fleet, tmp_path, repository)
    machines = {}
    for pattern, (vm_name, hypervisor) in enumerate(
            [("web", "hv1"), ("db", "hv1"), ("web", "hv2"), ("mail", "hv2"), ("old", "hv1"), ("broken", "hv2")]):
        machines["%s@%s" % (vm_name, hypervisor)] = vms(
            [DiskSpec("vda", size=16 * MiB)], name=vm_name, under=ssh_fleet.vm_dirs[hypervisor],
            prepare=lambda vm, p=0x31 + pattern: vm.write("vda", 0, 2 * MiB, p))
    for name in ("old@hv1", "broken@hv2"):  # seen running by a module on their hypervisor, then shut down
        hypervisor = name.split("@")[1]
        seen = run_module("qemu_backup_info", qmp_socket=machines[name].qmp_socket,
                          state_dir=str(tmp_path / hypervisor / "state"))
        assert not seen.failed, seen
        machines[name].quit()
    broken = machines.pop("broken@hv2")  # its image is another file now: refused, alone
    os.rename(broken.image("vda"), broken.image("vda") + ".moved")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", broken.image("vda"), str(16 * MiB)], check=True)

    points = [{name: vm.mark("vda") for name, vm in machines.items()}]
    rc, results, output, summary = run_fleet(ssh_fleet, "-vvv")
    assert rc != 0 and list(results["failures"]) == ["broken@hv2"], output[-5000:]
    assert "is not the file" in line_of(summary, "broken@hv2")
    for name in machines:
        assert " full " in line_of(summary, name), summary
    assert "(offline)" in line_of(summary, "old@hv1")
    # The role's steps, each on its host: begin, copy and commit on the backup host, start and stop on the VM's
    # hypervisor (hv1 runs web, db and old; hv2 web, and broken, which fails at its start), and no other module.
    steps = {name: len(re.findall(r"<%s> SSH: EXEC ssh .*-o Port=%d .*AnsiballZ_qemu_backup\.py" % (
        re.escape(server.address), server.port), output)) for name, server in ssh_fleet.servers.items()}
    assert steps["backup"] >= 3 * len(machines) and steps["hv1"] >= 2 * 3 and steps["hv2"] >= 2 + 1, steps
    assert not re.search(r"AnsiballZ_qemu_(backup_(copy|start|stop|repository)|checkpoint)\.py", output)
    for name in ("hv1", "hv2"):
        assert "nbds://%s:" % ssh_fleet.servers[name].address in output

    machines["old@hv1"].start()  # running again: its chain goes on online, from the checkpoint added offline
    for name, vm in machines.items():
        vm.write("vda", 4 * MiB, MiB, 0x41)
    points.append({name: vm.mark("vda") for name, vm in machines.items()})
    rc, results, output, summary = run_fleet(ssh_fleet)
    assert list(results["failures"]) == ["broken@hv2"], output[-5000:]
    for name in machines:
        assert " incremental " in line_of(summary, name), summary
    assert "(offline)" not in line_of(summary, "old@hv1")

    for name, vm in machines.items():
        backups = manifest(str(repository), name)
        assert [b["level"] for b in backups] == ["full", "incremental"], name
        for point, backup in zip(points, backups):
            assert restores(vm, str(repository), name, backup, point[name], tmp_path), (name, backup)
        Backups(vm, str(tmp_path / name.split("@")[1])).assert_nothing_left()
    assert not os.path.exists(os.path.join(repository, "broken@hv2", "manifest.json"))
    # Its failed runs gave their lease up on the backup host, and left no file there.
    assert os.listdir(os.path.join(repository, "broken@hv2")) == ["lock"]
    assert (repository / "broken@hv2" / "lock").read_text() == ""
