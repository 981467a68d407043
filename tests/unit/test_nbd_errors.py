"""libnbd's errors become ours: naming the action and the export, saying what to check, keeping libnbd's error."""

import errno

import nbd
import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import TranslatedError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.client import (
    ADVICE,
    TLS_ADVICE,
    Connection,
    NbdError,
    NbdErrorHandler,
)


def refused():
    raise nbd.Error("connect: Connection refused", errno.ECONNREFUSED)


def test_a_libnbd_error_names_the_action_and_the_export_and_keeps_its_cause():
    errors = NbdErrorHandler.for_export("nbd+unix:///vda?socket=/run/x.nbd")
    with pytest.raises(NbdError) as raised:
        errors.call("connect to", refused)
    assert str(raised.value) == ("Cannot connect to NBD export nbd+unix:///vda?socket=/run/x.nbd: connect: Connection "
                                 "refused (ECONNREFUSED); %s." % ADVICE)
    assert isinstance(raised.value, TranslatedError) and isinstance(raised.value.cause, nbd.Error)


def test_over_tls_the_advice_also_names_the_certificates():
    with pytest.raises(NbdError) as raised:
        NbdErrorHandler.for_export("nbds://192.0.2.1:10809/vda").call("connect to", refused)
    assert str(raised.value).endswith("(ECONNREFUSED); %s%s." % (ADVICE, TLS_ADVICE))


def test_each_export_keeps_its_own_name():
    first, second = NbdErrorHandler.for_export("nbd://a/vda"), NbdErrorHandler.for_export("nbd://b/vdb")
    assert "NBD export nbd://a/vda:" in first.message("read offset 0 of", "EIO")
    assert "NBD export nbd://b/vdb:" in second.message("read offset 0 of", "EIO")


def test_other_errors_pass_untouched():
    with pytest.raises(ZeroDivisionError):
        NbdErrorHandler.for_export("nbd://a/vda").call("read offset 0 of", lambda: 1 / 0)


def test_a_missing_socket_fails_the_connect_naming_it(tmp_path):
    url = "nbd+unix:///vda?socket=%s" % (tmp_path / "none.nbd")
    with pytest.raises(NbdError) as raised:
        Connection(url)
    assert str(raised.value).startswith("Cannot connect to NBD export %s: " % url)
    assert "No such file or directory" in str(raised.value)


def test_a_handled_function_names_the_action_with_its_arguments_defaults_included():
    from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import ErrorHandler, TranslatedError

    class ValueErrors(ErrorHandler):
        library_errors = (ValueError,)

    @ValueErrors.handles("Reading disk {disk} at {offset}")
    def read(disk, offset=0):
        raise ValueError("no such block")

    with pytest.raises(TranslatedError, match=r"^Reading disk vda at 0 failed: no such block$") as failure:
        read("vda")
    assert isinstance(failure.value.cause, ValueError)
    with pytest.raises(KeyError):
        ValueErrors.handles("{disk}")(lambda disk: {}[disk])("vda")  # not the library's: untouched
