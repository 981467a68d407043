"""The change-rate signal: a VM's dirty share against its own median, flagged far above it, never an error."""

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.change_rate import (
    HISTORY,
    MIN_SAMPLES,
    change_signal,
)

DISK = 100 * 2**30


def incremental(share, disk=DISK):
    return dict(level="incremental", dirty_bytes=int(share * disk), disk_bytes=disk)


def history(*shares):
    return [dict(level="full")] + [incremental(share) for share in shares]


def test_a_surge_far_above_the_median_and_over_a_tenth_of_the_disk_is_flagged():
    signal = change_signal(history(0.01, 0.02, 0.014, 0.012), int(0.42 * DISK), DISK, ["vda", "vdb"])
    assert signal["flagged"] and signal["samples"] == 4
    assert signal["share"] == pytest.approx(0.42) and signal["median_share"] == pytest.approx(0.013)
    assert signal["dirty_bytes"] == int(0.42 * DISK) and signal["disk_bytes"] == DISK
    assert signal["note"] == ("vda,vdb: 42% of the disk changed since the last backup, 32x its median of 1.3%: mass "
                              "rewriting, such as ransomware encrypting, looks like this")


@pytest.mark.parametrize("shares,share,why", [
    ((0.01, 0.01), 0.5, "too few samples to compare with"),
    ((0.01, 0.01, 0.01), 0.04, "not over a tenth of the disk"),
    ((0.05, 0.05, 0.05), 0.2, "not over 5x the median"),
    ((0.01, 0.01, 0.01), 0.01, "usual"),
])
def test_what_is_not_flagged(shares, share, why):
    signal = change_signal(history(*shares), int(share * DISK), DISK)
    assert not signal["flagged"] and signal["note"] is None, why


def test_the_median_is_of_the_latest_recorded_incrementals_only():
    # Old surges beyond HISTORY, fulls, and entries recorded before the counts (no dirty_bytes) do not count.
    old = [incremental(0.9)] * 5
    unrecorded = [dict(level="incremental"), dict(level="incremental", dirty_bytes=5)]
    backups = old + [dict(level="full", dirty_bytes=DISK, disk_bytes=DISK)] + unrecorded + [incremental(0.01)] * HISTORY
    signal = change_signal(backups, int(0.3 * DISK), DISK)
    assert signal["samples"] == HISTORY and signal["median_share"] == pytest.approx(0.01) and signal["flagged"]


def test_a_vm_whose_disks_never_changed_is_flagged_on_a_surge():
    signal = change_signal(history(0, 0, 0), DISK // 2, DISK, ["vda"])
    assert signal["flagged"] and signal["median_share"] == 0
    assert signal["note"].startswith("vda: 50% of the disk changed since the last backup, where its median is 0%")


@pytest.mark.parametrize("backups,dirty,disk", [
    (None, 10, 100),
    ("not a list", 10, 100),
    ([None, 3, "x", dict(level="incremental", dirty_bytes="many", disk_bytes=0)], 10, 100),
    (history(0.01, 0.01, 0.01), 10, 0),
    (history(0.01, 0.01, 0.01), None, None),
    (history(0.01, 0.01, 0.01), -5, 100),
    (history(0.01, 0.01, 0.01), True, 100),
])
def test_odd_input_gives_no_signal_and_no_error(backups, dirty, disk):
    signal = change_signal(backups, dirty, disk)
    assert not signal["flagged"] and signal["note"] is None
    assert set(signal) == {"dirty_bytes", "disk_bytes", "share", "median_share", "samples", "flagged", "note"}


def test_a_count_above_the_disk_size_is_a_whole_disk():
    signal = change_signal(history(0.01, 0.01, 0.01), 3 * DISK, DISK)
    assert signal["share"] == 1.0 and signal["flagged"]


def test_min_samples_is_the_threshold():
    assert not change_signal(history(*[0.01] * (MIN_SAMPLES - 1)), DISK // 2, DISK)["flagged"]
    assert change_signal(history(*[0.01] * MIN_SAMPLES), DISK // 2, DISK)["flagged"]
