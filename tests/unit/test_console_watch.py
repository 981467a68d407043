"""A drill's guest is stuck when its console fell silent while its vCPUs idled: processes stand in for QEMU."""

import subprocess
import sys
import time

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.console_watch import ConsoleWatch, DrillFailed


@pytest.fixture
def process():
    started = []

    def start(code):
        started.append(subprocess.Popen([sys.executable, "-c", code]))  # pylint: disable=consider-using-with
        return started[-1].pid

    yield start
    for child in started:
        child.kill()
        child.wait()


def watch_for(seconds, watch):
    """check() until seconds have passed; the DrillFailed it raised, or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            watch.check()
        except DrillFailed as failure:
            return failure
        time.sleep(0.1)
    return None


def test_a_silent_idle_guest_is_stuck_and_a_silent_busy_one_is_not(tmp_path, process):
    console = tmp_path / "console.log"
    console.write_text("SYSLINUX 6.04\nboot: ")
    idle = ConsoleWatch(str(console), 1, process("import time; time.sleep(60)"))
    busy = ConsoleWatch(str(console), 1, process("while True: pass"))
    assert "wrote nothing more on its serial console for 1 s" in str(watch_for(3, idle))
    assert watch_for(3, busy) is None


def test_a_guest_that_never_wrote_on_its_console_or_a_watch_turned_off_is_not_judged(tmp_path, process):
    console = tmp_path / "console.log"
    pid = process("import time; time.sleep(60)")
    assert watch_for(2, ConsoleWatch(str(console), 1, pid)) is None
    console.write_text("BdsDxe: loading Boot0001\n")
    assert watch_for(2, ConsoleWatch(str(console), 0, pid)) is None
