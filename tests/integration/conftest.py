import pytest

from support.qemu_vm import Vm


@pytest.fixture
def vms(tmp_path):
    """Make VMs (kind: Vm, or GuestVm for a running guest) in this test's directory.

    Every one is killed by its PID at teardown, pass or fail.
    """
    started = []

    def make(disks, name="vm", start=True, prepare=None, kind=Vm, **options):
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        vm = kind(str(workdir), disks, **options)
        started.append(vm)
        if prepare:
            prepare(vm)
        return vm.start() if start else vm

    yield make
    for vm in started:
        vm.kill()


@pytest.fixture
def scratch(tmp_path):
    path = tmp_path / "scratch"
    path.mkdir()
    return str(path)
