"""Encryption at rest: the option's secret, the secret object's pipe, the specs that open encrypted chains, and the
plan that keeps a chain all encrypted or all plain."""

import os

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.encryption import (
    SECRET_ID,
    encryption_from,
    image_options,
    no_encryption,
)
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.policy import chain_facts, plan_from

from test_repository import NOW, backup, repository, vm_disk, with_images  # noqa: F401 pylint: disable=unused-import

KEY = dict(format="luks", **{"key-secret": SECRET_ID})


def test_the_secret_comes_from_its_file_whole_or_from_the_option(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"s3cret\n")
    assert encryption_from(dict(secret_file=str(path), secret=None, iter_time=10)).secret == b"s3cret\n"
    assert encryption_from(dict(secret_file=None, secret="s3cret", iter_time=2000)).secret == b"s3cret"
    assert encryption_from(None) is None
    path.write_bytes(b"")
    refused = [(dict(secret_file=str(path)), "empty"), (dict(secret_file=str(tmp_path / "none")), "does not exist"),
               (dict(secret="x" * 10, iter_time=0), "iter_time"), (dict(secret="x" * 4097), "too long"),
               (dict(iter_time=10), "needs its secret")]
    for options, words in refused:
        with pytest.raises(UserError, match=words):
            encryption_from(options)


def test_qemu_reads_the_secret_from_a_pipe_that_is_gone_after_the_block():
    encryption = encryption_from(dict(secret="s3cret"))
    with encryption.qemu_args() as (args, fds):
        [fd] = fds
        assert args == ["--object", "secret,id=%s,file=/dev/fd/%d" % (SECRET_ID, fd)]
        assert os.read(fd, 100) == b"s3cret" and os.read(fd, 100) == b""  # whole, then its end
    with pytest.raises(OSError):
        os.fstat(fd)
    with no_encryption().qemu_args() as nothing:
        assert nothing == ([], ())


def test_each_encrypted_layer_of_a_chain_gets_the_secret():
    spec = image_options(dict(driver="qcow2"), [False, True, True])
    assert spec == dict(driver="qcow2", backing=dict(encrypt=KEY, backing=dict(encrypt=KEY)))
    assert image_options(dict(driver="qcow2"), [True]) == dict(driver="qcow2", encrypt=KEY)


def encrypted_backup(name, **args):
    entry = backup(name, **args)
    entry["disks"][0]["encryption"] = "luks"
    return entry


def test_a_chain_stays_all_encrypted_or_all_plain(repository):  # noqa: F811
    disks = [vm_disk(checkpoints=[("ckpt-b1", True)])]
    for newest, run, level in ((encrypted_backup("b1"), "luks", "incremental"), (backup("b1"), "luks", "full"),
                               (encrypted_backup("b1"), None, "full"), (backup("b1"), None, "incremental")):
        facts = dict(chain_facts(repository, with_images(repository, dict(backups=[newest])), NOW), encryption=run)
        planned = plan_from(facts, "auto", 0, disks, None, NOW)
        assert planned["level"] == level, (newest, run)
        if level == "full":
            assert "a chain is all encrypted or all plain" in planned["reason"]
