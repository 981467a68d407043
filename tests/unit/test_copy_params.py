"""qemu_backup_copy refuses, before it connects or writes anything, what the engine or qcow2 cannot do."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.image_copy import check_params

MiB = 1024 ** 2


def params(tmp_path, **changes):
    values = dict(src="nbd+unix:///vda?socket=/x.nbd", dest=str(tmp_path / "b2.vda.qcow2"), format="qcow2",
                  dirty_bitmap=None, backing=None, backing_format="qcow2", connections=4, requests=16,
                  request_size=256 * 1024, tls_certificates=None, compress="none", compress_level=3)
    values.update(changes)
    return values


@pytest.mark.parametrize("connections,requests,request_size", [(16, 64, MiB), (1, 512, 2 * MiB), (2, 16, 32 * MiB)])
def test_read_buffers_up_to_1_gib_are_allowed(tmp_path, connections, requests, request_size):
    assert check_params(params(tmp_path, connections=connections, requests=requests, request_size=request_size)) \
        == str(tmp_path)  # dest's directory


@pytest.mark.parametrize("connections,requests,request_size", [(16, 64, MiB + 64 * 1024), (2, 1024, MiB),
                                                               (16, 1024, 32 * MiB)])
def test_read_buffers_over_1_gib_are_refused_naming_the_three_options(tmp_path, connections, requests, request_size):
    with pytest.raises(UserError) as failure:
        check_params(params(tmp_path, connections=connections, requests=requests, request_size=request_size))
    assert str(failure.value) == (
        "connections x requests x request_size = %d x %d x %d = %d bytes of read buffers, more than the 1073741824 "
        "(1 GiB) a copy may take: lower one of them."
        % (connections, requests, request_size, connections * requests * request_size))


def test_a_backing_file_whose_relative_name_qcow2_cannot_store_is_refused(tmp_path):
    # Five directory levels of 250 bytes: the name relative to dest's directory is over 1250 bytes.
    deep = tmp_path.joinpath(*["d" * 250] * 5)
    deep.mkdir(parents=True)
    (deep / "b1.vda.qcow2").write_bytes(b"")
    (tmp_path / "near.qcow2").write_bytes(b"")
    assert check_params(params(tmp_path, backing=str(tmp_path / "near.qcow2"))) == str(tmp_path)
    with pytest.raises(UserError, match="The backing file name d{60}... is 1267 bytes long, more than the 1023"):
        check_params(params(tmp_path, backing=str(deep / "b1.vda.qcow2")))


@pytest.mark.parametrize("changes,refusal", [
    (dict(format="raw"), "compress=zstd needs format qcow2"),
    (dict(compress_level=0), "compress_level must be 1 to 19, or -10 to -1 for zstd's fast levels, not 0"),
    (dict(compress_level=20), "compress_level must be 1 to 19, or -10 to -1 for zstd's fast levels, not 20"),
    (dict(compress_level=-11), "compress_level must be 1 to 19, or -10 to -1 for zstd's fast levels, not -11"),
    (dict(encryption=dict(format="luks", secret="s")), "compress=zstd and encryption cannot go together"),
])
def test_a_compression_the_image_cannot_have_is_refused(tmp_path, changes, refusal):
    with pytest.raises(UserError, match=refusal):
        check_params(params(tmp_path, compress="zstd", **changes))
