#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: fleetbackup.qemu contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_backup_copy_status
short_description: Show the progress of running backup copies
version_added: 0.1.0
description:
  - 'Reads the progress that M(fleetbackup.qemu.qemu_backup_copy) keeps on the host that copies, for one or more
    destination images, and returns it per copy with a line like
    C(vda: 42% (1.2 GiB of 2.9 GiB\) at 310 MiB/s, about 6 s left).'
  - C(done) and C(total) count the bytes a copy processes, data it reads and zeros it writes into an overlay;
    C(total) is known once the copy has mapped the disk.
  - With O(wait), it waits until a copy moved (or only until one ended, O(wait_for=end)), at most O(wait) seconds,
    which suits a loop that shows a line per round while copies run under C(async).
  - It only reads. A copy whose process is gone without ending (killed) shows as C(gone).
author:
  - fleetbackup.qemu developers (@fleetbackup)
extends_documentation_fragment:
  - fleetbackup.qemu.vm.copy_progress
options:
  dest:
    description: The image a copy writes, its O(fleetbackup.qemu.qemu_backup_copy#module:dest).
    type: path
  dests:
    description: Several images, as O(dest).
    type: list
    elements: path
  names:
    description: Names for the copies in RV(msg) and RV(copies[].msg), one per O(dests) (or O(dest)); their file names
      by default.
    type: list
    elements: str
  wait:
    description:
      - Seconds to wait at most for something to happen. C(0) answers at once.
      - It answers at once as well when no copy is running.
    type: float
    default: 0
  wait_for:
    description:
      - With O(wait), what ends the wait early. C(progress), any copy's record changed (it started, moved, about
        once a second, or ended); C(end), a copy ended.
    type: str
    choices: [progress, end]
    default: progress
attributes:
  check_mode:
    support: full
    description: It only reads, in check mode too.
"""

EXAMPLES = r"""
- name: Copy each disk in the background
  fleetbackup.qemu.qemu_backup_copy:
    src: "{{ item.url }}"
    dest: "/backup/web1/{{ item.disk }}.qcow2"
  loop: "{{ started.backup.disks }}"  # vda and vdb
  async: 86400
  poll: 0
  register: copies

# Each round's line shows as the round ends: the label is rendered with the round's result.
- name: Show a line every 10 seconds until the copies end
  fleetbackup.qemu.qemu_backup_copy_status:
    dests: [/backup/web1/vda.qcow2, /backup/web1/vdb.qcow2]
    names: [vda, vdb]
    wait: 10
    wait_for: end
  loop: "{{ range(8642) | list }}"
  loop_control:
    label: "{{ progress.msg }}"
    break_when: progress.ended
  register: progress

- name: Ad hoc, once
  fleetbackup.qemu.qemu_backup_copy_status:
    dest: /backup/web1/vda.qcow2

- name: Collect the results
  ansible.builtin.async_status:
    jid: "{{ item.ansible_job_id }}"
  loop: "{{ copies.results }}"
"""

RETURN = r"""
copies:
  description: Per destination, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    dest:
      description: The destination image.
      type: str
    state:
      description:
        - C(not started) (no record), C(starting) (mapping the disk), C(copying), C(done), C(failed), or C(gone)
          (its process is gone without ending, killed).
      type: str
    running:
      description: Whether its copy's process is alive and copying.
      type: bool
    ended:
      description: Whether it ended (done, failed or gone).
      type: bool
    done:
      description: Bytes processed (read, or written as zeros).
      type: int
    total:
      description: Bytes the copy will process; null until the disk is mapped.
      type: int
    rate:
      description: Bytes per second over the last 10 seconds or so, and for an ended copy its average; null before
        the first measure.
      type: int
    eta:
      description: Seconds left, estimated from the rate; null when unknown.
      type: int
    started:
      description: When the copy began, in seconds since the epoch.
      type: float
    updated:
      description: When its record was last written, in seconds since the epoch.
      type: float
    pid:
      description: The copy's process.
      type: int
    msg:
      description: 'One line, like C(vda: 42% (1.2 GiB of 2.9 GiB\) at 310 MiB/s, about 6 s left); for a failed copy,
        its error.'
      type: str
running:
  description: Whether any copy is running.
  returned: always
  type: bool
ended:
  description: Whether every copy ended.
  returned: always
  type: bool
msg:
  description: The copies' lines, joined with C(; ).
  returned: always
  type: str
"""

import time

from ansible_collections.fleetbackup.qemu.plugins.module_utils._nbd.progress import copies_dir, read_status
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.errors import UserError
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.module_base import FleetbackupModule
from ansible_collections.fleetbackup.qemu.plugins.module_utils._base.options import COPY_PROGRESS_ARGUMENT_SPEC

# Seconds between two looks at the records while waiting: they change about once a second.
POLL = 0.2


def main():
    module = FleetbackupModule(
        argument_spec=dict(
            dest=dict(type="path"),
            dests=dict(type="list", elements="path"),
            names=dict(type="list", elements="str"),
            wait=dict(type="float", default=0),
            wait_for=dict(type="str", choices=["progress", "end"], default="progress"),
            **COPY_PROGRESS_ARGUMENT_SPEC,
        ),
        mutually_exclusive=[("dest", "dests")],
        required_one_of=[("dest", "dests")],
        supports_check_mode=True,
    )
    module.run(copy_status)


def copy_status(module):
    params = module.params
    dests = params["dests"] or [params["dest"]]
    names = params["names"] or [None] * len(dests)
    if len(names) != len(dests):
        raise UserError("names has %d entries for %d dests: give one name per dest, or none."
                        % (len(names), len(dests)))
    directory = copies_dir(params["state_dir"], create=False)
    deadline = time.monotonic() + params["wait"]
    first = copies = [read_status(directory, dest, name) for dest, name in zip(dests, names)]
    while not all(c["ended"] for c in copies) and not _moved(first, copies, params["wait_for"]):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(POLL, left))
        copies = [read_status(directory, dest, name) for dest, name in zip(dests, names)]
    return dict(changed=False, copies=copies, running=any(c["running"] for c in copies),
                ended=all(c["ended"] for c in copies), msg="; ".join(c["msg"] for c in copies))


def _moved(first, now, wait_for):
    if wait_for == "end":
        return [c["ended"] for c in first] != [c["ended"] for c in now]
    return [(c["state"], c["updated"]) for c in first] != [(c["state"], c["updated"]) for c in now]


if __name__ == "__main__":
    main()
