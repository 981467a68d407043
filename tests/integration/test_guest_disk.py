"""The guest disk boots through the firmware under TCG; its agent freezes and thaws it; its workload's log holds."""

from support.guest import BootedGuestVm, workload_files
from support.qemu_vm import DiskSpec


def workload(agent, *args):
    """fbg-workload's answer, as words; it must succeed."""
    result = agent.run("fbg-workload", args, timeout=90)
    assert result.exitcode == 0, result
    return result.stdout.decode().split()


def test_the_disk_boots_and_its_agent_freezes_and_runs_commands(vms, scratch):
    vm = vms([DiskSpec("vdb")], kind=BootedGuestVm)
    agent = vm.agent()  # waits for the boot: the firmware, extlinux, the kernel, then qemu-ga
    try:
        agent.ping()
        assert vm.wait_ready() == ["vda", "vdb"]  # the serial protocol, as the kernel-booted guest speaks it

        assert workload(agent, "start", "16") == ["started"]
        workload(agent, "wait", "3")
        assert agent.fsfreeze_status() == "thawed"
        assert agent.fsfreeze_freeze() == 1  # the root file system, where /data is
        assert agent.fsfreeze_status() == "frozen"
        assert agent.fsfreeze_thaw() == 1
        assert agent.fsfreeze_status() == "thawed"
        thawed_at = int(workload(agent, "status")[1])
        workload(agent, "wait", str(thawed_at + 2))  # the writes resumed
        state, logged = workload(agent, "stop")
        assert state == "stopped"

        log = agent.run("cat", ["/data/checksums.log"])
        assert log.exitcode == 0 and log.stderr == b""
        lines = log.stdout.decode().splitlines()
        assert len(lines) == int(logged)
        assert all(line.endswith("  /data/file-%d" % index) for index, line in enumerate(lines))
        assert workload(agent, "verify") == ["verified", logged]
        missing = agent.run("cat", ["/data/no-such-file"])
        assert missing.exitcode == 1 and b"No such file" in missing.stderr
    finally:
        agent.close()
    vm.kill()  # as a crash would: what the workload logged was fsync'd
    assert workload_files(vm.image("vda"), scratch) == (int(logged), [])
