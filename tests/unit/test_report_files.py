"""The report's files: the report directory (read back only what we made, refusals before any write), the
Prometheus metrics (parsed back, escaped, published 0644 atomically), check mode and pruning."""

import json
import os
import re
import stat

import pytest

from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.report_store import report_run
from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.run_metrics import prometheus_text
from support.prometheus import parse_prometheus

NOW = 1796660000
NOBODY = 65534


def summaries():
    return [
        dict(vm="web1", result="ok", level="incremental", backup="b1", bytes=2048, seconds=1.5, finished=NOW,
             newest=dict(name="b1", finished=NOW - 10), rpo=86400,
             change=dict(dirty_bytes=42, disk_bytes=100, share=0.42, median_share=0.01, samples=4, flagged=True,
                         note="vda: 42%")),
        dict(vm='odd "vm" \\ with\na newline', result="failed", reason="x", finished=NOW),
    ]


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def dirs(tmp_path):
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    metrics.chmod(0o755)
    return str(tmp_path / "home" / "reports"), str(metrics)


def run(report_dir, metrics_dir=None, items=None, now=NOW, **options):
    return report_run(summaries() if items is None else items, report_dir, now, metrics_dir, **options)


def test_the_metrics_parse_back_with_every_family_and_escaped_labels():
    result = run("/nonexistent/reports", check_mode=True)
    families = parse_prometheus(prometheus_text(result["report"]))
    odd = 'odd "vm" \\ with\na newline'
    assert families["fleetbackup_last_success_timestamp_seconds"]["samples"] == {"web1": NOW - 10}
    assert families["fleetbackup_last_run_success"]["samples"] == {"web1": 1, odd: 0}
    assert families["fleetbackup_failures_total"] == dict(
        type="counter", help="Runs that failed or did not reach the VM, across reports.", samples={"web1": 0, odd: 1})
    assert families["fleetbackup_last_run_duration_seconds"]["samples"] == {"web1": 1.5}
    assert families["fleetbackup_last_run_bytes"]["samples"] == {"web1": 2048, odd: 0}
    assert families["fleetbackup_rpo_seconds"]["samples"] == {"web1": 86400}
    assert families["fleetbackup_rpo_breached"]["samples"] == {"web1": 0, odd: 0}
    assert families["fleetbackup_change_share"]["samples"] == {"web1": 0.42}
    assert families["fleetbackup_change_flagged"]["samples"] == {"web1": 1, odd: 0}
    assert families["fleetbackup_last_run_timestamp_seconds"]["samples"] == {"web1": NOW, odd: NOW}
    assert families["fleetbackup_report_timestamp_seconds"]["samples"] == {None: NOW}
    assert all(family["type"] == "gauge" for name, family in families.items() if name != "fleetbackup_failures_total")


def test_a_run_writes_its_report_latest_and_the_metrics_with_their_modes(dirs):
    report_dir, metrics_dir = dirs
    result = run(report_dir, metrics_dir)
    assert result["changed"] and result["report_file"] == os.path.join(report_dir, "20261207T161320Z.json")
    assert result["latest_file"] == os.path.join(report_dir, "latest.json")
    assert result["metrics_file"] == os.path.join(metrics_dir, "fleetbackup.prom")
    assert mode(report_dir) == 0o700 and mode(result["report_file"]) == 0o600 and mode(result["latest_file"]) == 0o600
    assert mode(result["metrics_file"]) == 0o644 and os.listdir(metrics_dir) == ["fleetbackup.prom"]
    with open(result["latest_file"]) as latest, open(result["report_file"]) as own:
        assert json.load(latest) == json.load(own) == result["report"]
    with open(result["metrics_file"]) as stream:
        assert stream.read() == prometheus_text(result["report"])
    # A second run in the same second gets a report of its own, built on the first.
    again = run(report_dir, metrics_dir, items=[])
    assert again["report_file"].endswith("20261207T161320Z-1.json")
    assert again["report"]["previous"] == "20261207T161320Z"
    assert {entry["vm"]: entry["failures_total"] for entry in again["report"]["vms"]} == {
        "web1": 1, 'odd "vm" \\ with\na newline': 2}


def test_check_mode_writes_nothing_and_still_builds_on_the_previous_report(dirs):
    report_dir, metrics_dir = dirs
    result = run(report_dir, metrics_dir, check_mode=True)
    assert not result["changed"] and result["report_file"] is None and result["metrics_file"] is None
    assert not os.path.exists(report_dir) and os.listdir(metrics_dir) == []
    run(report_dir)
    before = sorted(os.listdir(report_dir))
    checked = run(report_dir, metrics_dir, items=[], check_mode=True)
    assert checked["report"]["previous"] == "20261207T161320Z" and checked["report"]["totals"]["unreached"] == 2
    assert sorted(os.listdir(report_dir)) == before and os.listdir(metrics_dir) == []


def test_old_run_reports_are_pruned_beyond_keep_reports(dirs):
    report_dir, _metrics = dirs
    for hour in range(5):
        result = run(report_dir, now=NOW + hour * 3600, keep_reports=3)
    assert result["pruned"] == ["20261207T171320Z.json"]
    assert sorted(os.listdir(report_dir)) == ["20261207T181320Z.json", "20261207T191320Z.json",
                                              "20261207T201320Z.json", "latest.json", "lock"]
    again = run(report_dir, now=NOW + 4 * 3600, keep_reports=2)
    # The run numbered -1 is newer than the one of the same second without a number.
    assert again["pruned"] == ["20261207T181320Z.json", "20261207T191320Z.json"]
    assert sorted(os.listdir(report_dir)) == ["20261207T201320Z-1.json", "20261207T201320Z.json", "latest.json",
                                              "lock"]
    with pytest.raises(UserError, match="keep_reports is -1"):
        run(report_dir, keep_reports=-1)


def refused(report_dir, metrics_dir, words):
    """The run fails saying words, and writes nothing in either directory."""
    before = {path: sorted(os.listdir(path)) if os.path.isdir(path) else None for path in (report_dir, metrics_dir)}
    with pytest.raises(UserError, match=words):
        run(report_dir, metrics_dir)
    assert before == {path: sorted(os.listdir(path)) if os.path.isdir(path) else None
                      for path in (report_dir, metrics_dir)}


def test_a_latest_report_that_we_did_not_make_is_refused(dirs, tmp_path):
    report_dir, metrics_dir = dirs
    run(report_dir)
    latest = os.path.join(report_dir, "latest.json")
    elsewhere = tmp_path / "planted.json"
    os.rename(latest, elsewhere)
    os.symlink(elsewhere, latest)
    refused(report_dir, metrics_dir, "Cannot open %s .*not a file that fleetbackup made" % re.escape(latest))
    os.unlink(latest)
    os.rename(elsewhere, latest)
    os.chown(latest, NOBODY, NOBODY)
    refused(report_dir, metrics_dir, "%s is not a file that fleetbackup made \\(owner uid 65534" % re.escape(latest))
    os.unlink(latest)
    with open(latest, "w") as stream:
        json.dump(dict(format=7), stream)
    os.chmod(latest, 0o600)
    refused(report_dir, metrics_dir, "is not a run report of this version")


def test_a_report_dir_of_another_user_or_that_others_can_enter_is_refused(dirs):
    report_dir, metrics_dir = dirs
    os.makedirs(report_dir, mode=0o700)
    os.chmod(report_dir, 0o777)
    refused(report_dir, metrics_dir, "%s has mode 777: .*choose another report_dir" % re.escape(report_dir))
    os.chmod(report_dir, 0o700)
    os.chown(report_dir, NOBODY, NOBODY)
    refused(report_dir, metrics_dir, "%s belongs to uid 65534.*Choose another report_dir" % re.escape(report_dir))
    os.rmdir(report_dir)
    os.symlink(metrics_dir, report_dir)
    refused(report_dir, metrics_dir, "is not a directory \\(a symlink\\?\\)")


def test_a_metrics_dir_that_others_could_swap_is_refused(dirs, tmp_path):
    report_dir, metrics_dir = dirs
    os.chmod(metrics_dir, 0o777)
    refused(report_dir, metrics_dir, "The directory %s of metrics_dir can be written by other users and is not "
            "sticky" % re.escape(metrics_dir))
    os.chmod(metrics_dir, 0o755)
    os.chown(metrics_dir, NOBODY, NOBODY)
    refused(report_dir, metrics_dir, "The directory %s of metrics_dir belongs to uid 65534" % re.escape(metrics_dir))
    link = str(tmp_path / "link")
    os.chown(metrics_dir, 0, 0)
    os.symlink(metrics_dir, link)
    refused(report_dir, link, "Cannot open metrics_dir %s .*not a symbolic link" % re.escape(link))
    refused(report_dir, str(tmp_path / "missing"), "does not exist: create it")
