"""The fixtures of the fleecing tests: a fake QEMU with three disks, and the connection a module makes to it."""

import pytest

from fake_qmp import FakeQmp
from fleecing_support import DISKS, make_vm


@pytest.fixture
def fake():
    """A running VM with the writable qcow2 virtio disks vda, vdb and vdc."""
    qemu = FakeQmp.with_disks(*DISKS)
    yield qemu
    qemu.shut_down()


@pytest.fixture
def vm(tmp_path, fake, monkeypatch):
    return make_vm(tmp_path, fake, monkeypatch)
