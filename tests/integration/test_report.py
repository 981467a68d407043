"""The run report as a fleet makes it: the last plays of each fleet playbook, as shipped, put every VM host's
summary (or none) into qemu_backup_report on the controller, run after run, and then fail the VMs that failed; a VM
that a later run does not mention is carried over as unreached, and its failures count on.

No backup runs here: a play before it sets each VM's qemu_backup_summary as the backup role would.
"""

import json
import os
import stat
import time

import yaml

from support.modules import run_playbook
from support.paths import COLLECTIONS
from support.prometheus import parse_prometheus

PLAYBOOKS = os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "playbooks")
REPORT_TASK = "Write the run's report, and its metrics for node_exporter"
# Sums up each VM as the backup role would, before the fleet playbook's own last play.
SUMMARIES_PLAY = """
- name: Sum up each VM as the backup role would
  hosts: %s
  gather_facts: false
  tasks:
    - name: Set the VM's summary
      ansible.builtin.set_fact:
        qemu_backup_summary: "{{ summary | combine({'finished': now, 'newest': {'name': 'b-' ~ inventory_hostname,
          'finished': now - age}}) }}"
      when: summary is defined
"""


def fleet_playbook(tmp_path, playbook, vm_group):
    """The summaries' play, then the plays of a fleet playbook from its Sum up on, as the collection ships them."""
    with open(os.path.join(PLAYBOOKS, playbook)) as stream:
        plays = yaml.safe_load(stream)
    names = [play["name"] for play in plays]
    sum_up, fail = plays[names.index("Sum up the fleet"):]
    assert sum_up["hosts"] == "localhost" and fail["name"].startswith("Fail the ")
    path = tmp_path / ("last-of-" + playbook)
    path.write_text(SUMMARIES_PLAY % vm_group + yaml.safe_dump([sum_up, fail], sort_keys=False))
    return path, sum_up["tasks"][0]["name"]


def failed_in(hosts):
    return sorted(name for name, (summary, _age) in hosts.items() if summary and summary["result"] == "failed")


FLAGGED = dict(dirty_bytes=45, disk_bytes=100, share=0.45, median_share=0.01, samples=4, flagged=True,
               note="vda: 45% of the disk changed since the last backup, 45x its median of 1.0%")


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


class ReportFleet:
    """Runs of backup_hypervisors.yml's last play, on VMs of hypervisor hv1 that the inventory lists."""

    def __init__(self, tmp_path, now):
        self.tmp_path = tmp_path
        self.now = now
        self.reports = tmp_path / "home" / "reports"
        self.metrics = tmp_path / "metrics"
        self.metrics.mkdir()
        self.metrics.chmod(0o755)
        self.playbook, self.lines_task = fleet_playbook(tmp_path, "backup_hypervisors.yml", "fleetbackup_vms")
        self.runs = 0

    def run(self, hosts, check=False):
        """One fleet run of the hosts {name: (summary or None, age of its newest backup)}; (the report task's
        result, the lines)."""
        self.runs += 1
        inventory = self.tmp_path / ("inventory-%d.json" % self.runs)
        local = {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}"}
        inventory.write_text(json.dumps({
            "all": {"vars": dict(local, now=self.now, fleetbackup_report_dir=str(self.reports),
                                 fleetbackup_metrics_dir=str(self.metrics), fleetbackup_rpo="1d")},
            "fleetbackup_vms": {"hosts": {name: dict(summary=summary, age=age, fleetbackup_hypervisor="hv1")
                                          if summary else {} for name, (summary, age) in hosts.items()}}}))
        rc, results, output = run_playbook(str(self.playbook), str(inventory),
                                           str(self.tmp_path / ("results-%d.json" % self.runs)), check=check)
        assert (rc == 0) == (not failed_in(hosts)) and sorted(results["failures"]) == failed_in(hosts), output[-3000:]
        for name in failed_in(hosts):  # each failed with its own run's reason, after the report
            assert results["failures"][name] == ["Fail the host with its error: " + hosts[name][0]["reason"]]
        tasks = results["tasks"]["localhost"]
        return tasks[REPORT_TASK], tasks[self.lines_task]["msg"]


def ok(vm, **more):
    return dict(dict(vm=vm, result="ok", backup="b1", level="incremental", bytes=1048576, seconds=0.8, reason=None,
                     rpo=None, change=None), **more)


def test_two_fleet_runs_write_reports_metrics_and_carry_a_vm_not_found_over(tmp_path):
    now = int(time.time())  # the module's clock is the real one: the backups' times are made around it
    fleet = ReportFleet(tmp_path, now)
    hosts = {
        "web1": (ok("web1"), 0),
        "web2": (ok("web2", rpo=7200, change=FLAGGED), 3600),
        "db1": (dict(vm="db1", result="failed", reason="the disk is full"), 30 * 3600),
        "mail": (None, 0),  # its host has no summary: its hypervisor was unreachable
    }
    first, lines = fleet.run(hosts)
    lines = {line.split(": ")[0]: line for line in lines}
    assert first["changed"] and lines["web1"] == "web1: incremental 1.00 MB in 0.8 s"
    assert lines["web2"] == "web2: incremental 1.00 MB in 0.8 s; " + FLAGGED["note"]
    assert lines["db1"] == "db1: failed: the disk is full"  # the line knows only the VM's own RPO, it has none
    assert lines["mail"] == "mail: unreached: no result: its hypervisor was unreachable, or the run stopped before it"
    report = first["report"]
    hypervisors = {entry["vm"]: entry["hypervisor"] for entry in report["vms"]}
    assert hypervisors == dict(web1="hv1", web2="hv1", db1="hv1", mail=None)
    assert [item["vm"] for item in report["attention"]] == ["db1", "mail", "web2"]
    assert report["totals"]["vms"] == 4 and report["totals"]["unreached"] == 1

    # The files: the directory made 0700, reports 0600, the metrics 0644 for node_exporter.
    assert mode(fleet.reports) == 0o700
    assert sorted(os.listdir(fleet.reports)) == sorted([report["name"] + ".json", "latest.json", "lock"])
    assert all(mode(fleet.reports / name) == 0o600 for name in os.listdir(fleet.reports))
    assert os.listdir(fleet.metrics) == ["fleetbackup.prom"] and mode(fleet.metrics / "fleetbackup.prom") == 0o644
    with open(fleet.reports / "latest.json") as stream:
        assert json.load(stream) == report
    metrics = parse_prometheus((fleet.metrics / "fleetbackup.prom").read_text())
    assert metrics["fleetbackup_failures_total"]["samples"] == {"db1": 1, "mail": 1, "web1": 0, "web2": 0}
    assert metrics["fleetbackup_rpo_seconds"]["samples"] == {"db1": 86400, "mail": 86400, "web1": 86400, "web2": 7200}
    assert metrics["fleetbackup_change_flagged"]["samples"]["web2"] == 1

    # Check mode: the same report built, nothing written.
    before = {path: sorted(os.listdir(path)) for path in (fleet.reports, fleet.metrics)}
    prom = (fleet.metrics / "fleetbackup.prom").read_bytes()
    checked, _lines = fleet.run(hosts, check=True)
    assert not checked["changed"] and checked["report_file"] is None and checked["report"]["previous"] == report["name"]
    assert before == {path: sorted(os.listdir(path)) for path in (fleet.reports, fleet.metrics)}
    assert (fleet.metrics / "fleetbackup.prom").read_bytes() == prom

    # The second run does not find web2 (its hypervisor was down): it is carried over as unreached, breaching its RPO.
    second, _lines = fleet.run({"web1": hosts["web1"], "db1": (ok("db1", level="full"), 0), "mail": (None, 0)})
    entries = {entry["vm"]: entry for entry in second["report"]["vms"]}
    web2 = entries["web2"]
    assert web2["result"] == "unreached" and web2["carried_over"] and web2["rpo_breached"]
    assert web2["newest"]["name"] == "b-web2" and web2["newest"]["finished"] == now - 3600
    assert web2["newest"]["age_seconds"] >= 3600 and web2["rpo_seconds"] == 7200
    assert {vm: entry["failures_total"] for vm, entry in entries.items()} == {"db1": 1, "mail": 2, "web1": 0, "web2": 1}
    metrics = parse_prometheus((fleet.metrics / "fleetbackup.prom").read_text())
    assert metrics["fleetbackup_failures_total"]["samples"] == {"db1": 1, "mail": 2, "web1": 0, "web2": 1}
    assert metrics["fleetbackup_last_success_timestamp_seconds"]["samples"]["web2"] == now - 3600
    assert metrics["fleetbackup_last_run_success"]["samples"] == {"db1": 1, "mail": 0, "web1": 1, "web2": 0}
    assert len([name for name in os.listdir(fleet.reports) if name.startswith("2026")]) == 2
    assert os.listdir(fleet.metrics) == ["fleetbackup.prom"]  # no temporary file left


def test_fleet_backup_sums_up_a_vm_without_a_summary_as_unreached(tmp_path):
    playbook, lines_task = fleet_playbook(tmp_path, "fleet_backup.yml", "vms")
    reports = tmp_path / "reports"
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({
        "all": {"vars": {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                         "fleetbackup_report_dir": str(reports), "now": int(time.time())}},
        "vms": {"hosts": {"web1": {"summary": ok("web1"), "age": 0}, "far": {}}}}))
    rc, results, output = run_playbook(str(playbook), str(inventory), str(tmp_path / "results.json"))
    assert rc == 0, output[-3000:]
    report = results["tasks"]["localhost"][REPORT_TASK]["report"]
    assert [(entry["vm"], entry["result"], entry["failures_total"]) for entry in report["vms"]] == [
        ("far", "unreached", 1), ("web1", "ok", 0)]
    assert report["vms"][1]["hypervisor"] is None and report["vms"][1]["rpo_seconds"] is None
    assert results["tasks"]["localhost"][lines_task]["msg"] == [
        "web1: incremental 1.00 MB in 0.8 s",
        "far: unreached: no result: its hypervisor was unreachable, or the run stopped before it"]
    assert sorted(os.listdir(reports)) == sorted([report["name"] + ".json", "latest.json", "lock"])


def test_a_run_in_which_every_vm_failed_still_reports_and_then_fails_them(tmp_path):
    playbook, _lines_task = fleet_playbook(tmp_path, "fleet_backup.yml", "vms")
    reports = tmp_path / "reports"
    inventory = tmp_path / "inventory.json"
    failed = {name: dict(vm=name, result="failed", reason="%s: the disk is full" % name) for name in ("web1", "db1")}
    inventory.write_text(json.dumps({
        "all": {"vars": {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                         "fleetbackup_report_dir": str(reports), "now": int(time.time())}},
        "vms": {"hosts": {name: {"summary": summary, "age": 0} for name, summary in failed.items()}}}))
    rc, results, output = run_playbook(str(playbook), str(inventory), str(tmp_path / "results.json"))
    assert rc != 0 and results["failures"] == {
        name: ["Fail the VM with its run's error: " + summary["reason"]] for name, summary in failed.items()}, output
    report = results["tasks"]["localhost"][REPORT_TASK]["report"]
    assert sorted((entry["vm"], entry["result"]) for entry in report["vms"]) == [("db1", "failed"), ("web1", "failed")]
    with open(reports / "latest.json") as stream:
        assert json.load(stream) == report


def test_a_fleet_wide_mistake_that_fails_every_vm_in_the_roles_checks_still_reports_them_as_failed(tmp_path):
    # No qemu_backup_repository anywhere: the role's check of its variables fails every VM before its first task.
    reports = tmp_path / "reports"
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({
        "all": {"vars": {"ansible_connection": "local", "ansible_python_interpreter": "{{ ansible_playbook_python }}",
                         "fleetbackup_report_dir": str(reports)}},
        "vms": {"hosts": {name: {"qemu_backup_qmp_socket": str(tmp_path / name / "qmp.sock")}
                          for name in ("web1", "db1")}}}))
    rc, results, output = run_playbook(os.path.join(PLAYBOOKS, "fleet_backup.yml"), str(inventory),
                                       str(tmp_path / "results.json"))
    assert rc != 0 and sorted(results["failures"]) == ["db1", "web1"], output[-3000:]
    for failures in results["failures"].values():  # the check's failure, rescued, then the last play's
        assert failures[-1].startswith("Fail the VM with its run's error: ") and "qemu_backup_repository" in failures[-1]
    report = results["tasks"]["localhost"][REPORT_TASK]["report"]
    assert sorted((entry["vm"], entry["result"]) for entry in report["vms"]) == [("db1", "failed"), ("web1", "failed")]
    assert all("qemu_backup_repository" in entry["reason"] for entry in report["vms"]), report
