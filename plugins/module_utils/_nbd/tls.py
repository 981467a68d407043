# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""NBD over TCP, with TLS: the listener's options, its URLs, and the x509 credentials of both ends.

A backup's exports may be read from another host (the backup host) over TCP. Then QEMU's NBD server
speaks TLS only, with x509 certificates of the fleet's CA, checks the client's certificate against that CA
(verify-peer) and admits only the distinguished names it is given (tls-authz). Plain TCP is for loopback
addresses alone, and only when asked for by name.

Credential directories use the file names that QEMU's tls-creds-x509 and libnbd both read:
ca-cert.pem, server-cert.pem and server-key.pem on the server; ca-cert.pem, client-cert.pem and
client-key.pem on the client. Their files are read without following links, and a private key that
others could read is refused.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from urllib.parse import quote

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.private_state import (
    check_trusted_directory,
    create_exclusive,
    remove_file,
)

SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
# A PEM certificate chain or key is a few KiB; anything this large is not one.
MAX_CREDENTIAL_BYTES = 1024 * 1024


def check_tcp_request(tcp):
    """Refuse a TCP listener that is not TLS-protected or cannot be reached by its URL; None when there is none."""
    if not tcp:
        return
    try:
        address = ipaddress.ip_address(tcp["host"])
    except ValueError:
        raise UserError("nbd_tcp.host %r is not an IP address: give the address of this hypervisor that the backup "
                        "host reaches; its server certificate must name it (an IP SAN), since the copy checks "
                        "the server's name against it." % tcp["host"]) from None
    if getattr(address, "scope_id", None):
        raise UserError("nbd_tcp.host %s has a zone (%%%s), which an NBD URL cannot carry: give an address without one."
                        % (tcp["host"], address.scope_id))
    if address.is_unspecified:
        raise UserError("nbd_tcp.host %s listens on every address, and the copy's URL needs one address that the "
                        "backup host reaches: give that address." % address)
    if not 0 <= tcp["port"] <= 65535:
        raise UserError("nbd_tcp.port %d is no TCP port: use 1 to 65535, or 0 for a free port (the start returns "
                        "the URL with the port it got)." % tcp["port"])
    if tcp["plain"]:
        if tcp["tls_dir"] or tcp["tls_allow"]:
            raise UserError("nbd_tcp.plain turns TLS off, so tls_dir and tls_allow would not apply: leave them out, "
                            "or drop plain.")
        if not address.is_loopback:
            raise UserError("Plain TCP (nbd_tcp.plain) is refused on %s: anyone who reaches that address could read "
                            "the VM's disks. Give nbd_tcp.tls_dir and tls_allow; plain TCP is only for loopback "
                            "addresses (127.0.0.0/8, ::1)." % address)
        return
    if not tcp["tls_dir"]:
        raise UserError("nbd_tcp needs tls_dir, a directory with the fleet CA's ca-cert.pem and this hypervisor's "
                        "server-cert.pem and server-key.pem (the fleetbackup.qemu.fleet_ca playbook makes them); "
                        "plain TCP without TLS needs plain: true and a loopback host.")
    if not tcp["tls_allow"]:
        raise UserError("nbd_tcp.tls_allow is empty: name the distinguished names of the client certificates that "
                        "may read the backup (the backup host's, as QEMU prints it, like "
                        "'O=fleet,OU=client,CN=backup1'); any other certificate of the CA is refused.")


def tcp_url(export, host, port, tls):
    """nbds://host:port/export (nbd:// without TLS); an IPv6 address in brackets."""
    address = ipaddress.ip_address(host)
    authority = "[%s]" % address if address.version == 6 else str(address)
    return "%s://%s:%d/%s" % ("nbds" if tls else "nbd", authority, port, quote(export))


def with_certificates(url, directory):
    """url asking libnbd for the client certificates in directory (tls-certificates=DIR)."""
    return "%s%stls-certificates=%s" % (url, "&" if "?" in url else "?", quote(directory, safe="/"))


def read_credentials(directory, names, option):
    """{name: bytes} of the credential files in a trusted directory; refuses links, non-files and open keys."""
    check_trusted_directory(directory, option, "the fleet CA's certificates and this host's certificate and key")
    contents = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UserError("%s %s lacks %s: it needs %s (the fleetbackup.qemu.fleet_ca playbook makes them)."
                            % (option, directory, name, ", ".join(names))) from None
        except OSError as err:
            raise UserError("Cannot open %s (%s): it must be a regular file, not a link." % (path, err.strerror)) \
                from None
        with os.fdopen(fd, "rb") as stream:
            info = os.fstat(fd)
            mode = stat.S_IMODE(info.st_mode)
            if not stat.S_ISREG(info.st_mode) or info.st_uid not in (0, os.geteuid()) or mode & 0o022:
                raise UserError("%s must be a regular file owned by root that nobody else can write (it is uid %d, "
                                "mode %o)." % (path, info.st_uid, mode))
            if name.endswith("-key.pem") and mode & 0o077:
                raise UserError("The private key %s can be read by others (mode %o): chmod 0600 it, and replace it "
                                "if others may have read it." % (path, mode))
            contents[name] = stream.read(MAX_CREDENTIAL_BYTES + 1)
        if len(contents[name]) > MAX_CREDENTIAL_BYTES or b"-----BEGIN " not in contents[name]:
            raise UserError("%s is not a PEM file." % path)
    return contents


def credential_copies_name(backup_id):
    """The directory, in the VM's private state, where a start's server credentials are copied for a moment."""
    return "tls-%s" % backup_id


def listen_tcp(host, port):
    """A TCP socket that we bind and listen on ourselves, for a server that gets it as a descriptor.

    So the server binds nothing (QEMU may run as any user), and a port of 0 becomes a free port that we
    know before any URL is handed out (neither QEMU nor qemu-nbd tells which one it got).
    """
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past connections' TIME_WAIT only
        listener.bind((host, port))
        listener.listen(16)
    except OSError as err:
        listener.close()
        raise UserError("cannot listen on %s port %d (%s): give an address of this host, and another nbd_tcp.port "
                        "or 0 for a free one" % (host, port, err.strerror)) from None
    return listener


@contextlib.contextmanager
def credential_copies(directory, contents, uid):
    """The server's credentials, as read and checked, copied into directory (inside our private state), owned by
    uid and readable by it alone, for as long as the server needs to load them: it reads them once, at start."""
    remove_credential_copies(directory)  # a copy that a killed start left
    os.mkdir(directory, 0o700)
    try:
        os.chmod(directory, 0o711)  # the private state directory around it is the barrier
        for name, data in contents.items():
            created = create_exclusive(directory, name)
            try:
                os.write(created.fd, data)  # a few KiB: one write
                os.fchown(created.fd, uid, -1)
                os.fchmod(created.fd, 0o400)
            finally:
                os.close(created.fd)
        yield directory
    finally:
        remove_credential_copies(directory)


def remove_credential_copies(directory):
    for name in SERVER_FILES:
        remove_file(os.path.join(directory, name))
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass


def authz_rules(allowed):
    """The rules of an authz-list that admits exactly these distinguished names."""
    return [{"match": name, "policy": "allow", "format": "exact"} for name in allowed]
