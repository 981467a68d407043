# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release.
"""A run report as Prometheus metrics, in the text exposition format 0.0.4 that node_exporter's textfile collector
reads: one sample per VM of each metric, labelled vm, and the report's own time.

A value that is unknown (no good backup yet, no RPO, no change measured) has no sample, rather than a made-up 0.
"""

from __future__ import annotations

# The file node_exporter's textfile collector reads (it reads *.prom).
METRICS_FILE = "fleetbackup.prom"


def _success(entry):
    return int(entry["result"] in ("ok", "nothing due"))


def _newest_finished(entry):
    return entry["newest"]["finished"] if entry["newest"] else None


def _change_share(entry):
    return entry["change"].get("share") if entry["change"] else None


# name, type, help, the value of a VM's entry (None: no sample).
VM_METRICS = (
    ("fleetbackup_last_success_timestamp_seconds", "gauge",
     "When the VM's newest good backup finished, in seconds since the epoch.", _newest_finished),
    ("fleetbackup_last_run_timestamp_seconds", "gauge",
     "When the VM's last run ended (or, not reached, was given up), in seconds since the epoch.",
     lambda entry: entry["finished"]),
    ("fleetbackup_last_run_duration_seconds", "gauge", "How long the VM's last run took.",
     lambda entry: entry["seconds"]),
    ("fleetbackup_last_run_bytes", "gauge", "Bytes the VM's last run read from its disks.",
     lambda entry: entry["bytes"]),
    ("fleetbackup_last_run_success", "gauge",
     "1 when the VM's last run backed it up or found nothing due, 0 when it failed or did not reach the VM.",
     _success),
    ("fleetbackup_failures_total", "counter", "Runs that failed or did not reach the VM, across reports.",
     lambda entry: entry["failures_total"]),
    ("fleetbackup_rpo_seconds", "gauge", "The VM's recovery-point objective.", lambda entry: entry["rpo_seconds"]),
    ("fleetbackup_rpo_breached", "gauge",
     "1 when the VM's newest good backup is older than its RPO, it has none, or it was not reached.",
     lambda entry: int(entry["rpo_breached"])),
    ("fleetbackup_change_share", "gauge",
     "The share of the VM's disks that changed since its previous backup, measured before its last incremental.",
     _change_share),
    ("fleetbackup_change_flagged", "gauge",
     "1 when that share was far above the VM's own median (mass rewriting, such as ransomware encrypting).",
     lambda entry: int(entry["change_flagged"])),
)
REPORT_TIME = ("fleetbackup_report_timestamp_seconds", "gauge",
               "When fleetbackup wrote its last run report, in seconds since the epoch.")


def escape_label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def sample_value(value):
    """A sample's value as the format writes it: integers without a point, other numbers as Python's repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def prometheus_text(report):
    """The report's metrics, every family with its HELP and TYPE lines, ending with a newline."""
    lines = []
    for name, kind, text, value_of in VM_METRICS:
        lines += ["# HELP %s %s" % (name, escape_help(text)), "# TYPE %s %s" % (name, kind)]
        for entry in report["vms"]:
            value = value_of(entry)
            if value is not None:
                lines.append('%s{vm="%s"} %s' % (name, escape_label_value(entry["vm"]), sample_value(value)))
    name, kind, text = REPORT_TIME
    lines += ["# HELP %s %s" % (name, escape_help(text)), "# TYPE %s %s" % (name, kind),
              "%s %s" % (name, sample_value(report["time"]))]
    return "\n".join(lines) + "\n"
