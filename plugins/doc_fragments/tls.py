# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The start's exports over TCP, with the server's TLS (their spec: NBD_TCP_ARGUMENT_SPEC in
    # module_utils/_base/options.py).
    DOCUMENTATION = r"""
options:
  nbd_tcp:
    description:
      - Serve the exports over TCP instead of the unix socket, so that M(fleetbackup.qemu.qemu_backup_copy) can read
        them from another host, such as the backup host that holds the repository.
      - QEMU's NBD server then speaks TLS only, with the x509 certificates in O(nbd_tcp.tls_dir). It checks every
        client's certificate against the CA (C(verify-peer)), and admits only those whose distinguished name is in
        O(nbd_tcp.tls_allow) (a C(tls-authz) filter); clients without a certificate, with one of another CA or with
        another name are refused before they see any export.
      - The module binds and listens on the address itself and hands QEMU the listening socket, as it does with the
        unix socket, so QEMU binds nothing and a free port (O(nbd_tcp.port=0)) is known before the URLs are
        returned. The listener, the credentials and the filter exist only until M(fleetbackup.qemu.qemu_backup_stop).
      - QEMU reads the credentials as the user it runs as (C(-runas)). The module copies them, as it checked them,
        into its private state directory for QEMU's user alone and hands QEMU a descriptor of that directory; the
        copies are removed as soon as QEMU has loaded them.
      - The URLs in RV(fleetbackup.qemu.qemu_backup_start#module:backup.disks[].url) are C(nbds://HOST:PORT/EXPORT);
        the copy adds its client certificates with O(fleetbackup.qemu.qemu_backup_copy#module:tls_certificates).
      - A stopped VM's disks are each served by a qemu-nbd of their own, with the same TLS checks. The module hands
        each a listener of its own (socket activation), so with several disks O(nbd_tcp.port) must be C(0), each
        disk's port is in its URL, and RV(fleetbackup.qemu.qemu_backup_start#module:backup.nbd_tcp.port) is null.
      - Not for running libvirt domains (O(domain)), since libvirt's backup server would admit every certificate of
        the CA and takes its certificates from C(qemu.conf) for the whole host. Such a start fails. A shut-off domain
        is served by qemu-nbd like any stopped VM, and may use it.
      - M(fleetbackup.qemu.qemu_backup_stop), which has no certificate that QEMU admits, ends the TCP server first and
        reads the backup's probes on a unix socket of its own, to report
        RV(fleetbackup.qemu.qemu_backup_stop#module:intact).
    type: dict
    suboptions:
      host:
        description:
          - The IP address of this hypervisor to listen on, one that the backup host reaches; it goes into the URLs.
          - The server certificate must name it as an IP SAN, since the copy checks the server's name.
          - A wildcard address (C(0.0.0.0), C(::)) is refused.
        type: str
        required: true
      port:
        description:
          - TCP port to listen on; C(0) takes a free port, returned in the URLs and in
            RV(fleetbackup.qemu.qemu_backup_start#module:backup.nbd_tcp.port).
          - Each running backup needs a port of its own.
        type: int
        default: 0
      tls_dir:
        description:
          - Directory on the hypervisor with the fleet CA's C(ca-cert.pem) and this hypervisor's C(server-cert.pem)
            and C(server-key.pem), as the C(fleetbackup.qemu.fleet_ca) playbook makes them.
          - The directory and files must belong to root and be writable by nobody else; the key must be readable by
            root alone (0600). Links are refused.
          - Required unless O(nbd_tcp.plain).
        type: path
      tls_allow:
        description:
          - The distinguished names of the client certificates that may read the exports, as QEMU prints them, in
            the order of the certificate's subject, like C(O=fleet,OU=client,CN=backup1). Usually the backup host's
            alone.
          - Required with O(nbd_tcp.tls_dir).
        type: list
        elements: str
      plain:
        description:
          - Serve plain NBD over TCP, without TLS. Anyone who reaches the address could read the disks, so it is
            refused unless O(nbd_tcp.host) is a loopback address, and even there every local user (and every
            container in the host's network namespace) can read them while the backup runs. For tests and
            benchmarks; use TLS, or the unix socket (root's alone), for real backups.
        type: bool
        default: false
"""

    # The copy's certificates for such an export (TLS_CLIENT_ARGUMENT_SPEC).
    CLIENT = r"""
options:
  tls_certificates:
    description:
      - For an C(nbds://) source (O(fleetbackup.qemu.qemu_backup_copy#module:src)), as a start with
        O(fleetbackup.qemu.qemu_backup_start#module:nbd_tcp) returns, the
        directory with the fleet CA's C(ca-cert.pem) and this host's C(client-cert.pem) and C(client-key.pem), as the
        C(fleetbackup.qemu.fleet_ca) playbook makes them on the backup host.
      - The copy checks the server's certificate against that CA and its name against the address in the source, and
        presents its own certificate, whose distinguished name the start must allow
        (O(fleetbackup.qemu.qemu_backup_start#module:nbd_tcp.tls_allow)).
      - The directory and files must belong to root (or this user) and be writable by nobody else; the key must be
        readable by its owner alone (0600). Links are refused.
      - Required for an C(nbds://) source, unless the source names them itself (C(tls-certificates=DIR)).
    type: path
"""
