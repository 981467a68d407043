# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""libvirt's Python bindings, where the host has them, and their errors in ours: one translator for every call."""

from __future__ import annotations

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import ErrorHandler, TranslatedError

try:
    import libvirt
    HAS_LIBVIRT = True
    LIBVIRT_IMPORT_ERROR = None
except ImportError as import_error:
    libvirt = None  # the modules say what to install before anything needs it
    HAS_LIBVIRT = False
    LIBVIRT_IMPORT_ERROR = import_error


class LibvirtFailure(TranslatedError):
    """A libvirt call failed; the message names libvirt's error and what was being done."""

    @property
    def code(self):
        """The VIR_ERR_* name of libvirt's error."""
        return error_name(self.cause)


def error_name(err):
    """The VIR_ERR_* name of a libvirtError, as libvirt's documentation spells it."""
    code = err.get_error_code()
    return next((name for name in dir(libvirt) if name.startswith("VIR_ERR_") and name != "VIR_ERR_NONE"
                 and getattr(libvirt, name) == code), "libvirt error %s" % code)


class LibvirtErrors(ErrorHandler):
    library_errors = (libvirt.libvirtError,) if HAS_LIBVIRT else ()
    error = LibvirtFailure

    @classmethod
    def detail(cls, err):
        return "%s: %s" % (error_name(err), err.get_error_message())


call = LibvirtErrors.call


def connect(uri):
    """A connection to libvirt at uri; its errors go in our messages, not on stderr."""
    libvirt.registerErrorHandler(lambda context, error: None, None)
    return call("Connecting to libvirt at %s" % uri, libvirt.open, uri)
