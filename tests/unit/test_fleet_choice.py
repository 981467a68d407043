"""Which hypervisor backs up a VM that more than one of them lists."""

from ansible_collections.fleetbackup.qemu.plugins.module_utils._repo.discovery import choose_fleet_vms


def hypervisor(name, *vms):
    return dict(inventory_hostname=name, qemu_hypervisor_state_dir="/var/lib/fleetbackup-" + name,
                fleetbackup_found=dict(vms=[dict(repository_name=vm, running=running) for vm, running in vms]))


def chosen(*hypervisors):
    return {entry["vm"]["repository_name"]: (entry["hypervisor"], entry["conflict"])
            for entry in choose_fleet_vms(list(hypervisors))}


def test_a_moved_vm_is_backed_up_where_it_runs_whichever_hypervisor_comes_first():
    old = hypervisor("hv1", ("db.6c0bd1a2", False), ("web@hv1", True))
    new = hypervisor("hv2", ("db.6c0bd1a2", True))
    for order in ((old, new), (new, old)):
        assert chosen(*order) == {"db.6c0bd1a2": ("hv2", ""), "web@hv1": ("hv1", "")}
    assert choose_fleet_vms([new])[0]["state_dir"] == "/var/lib/fleetbackup-hv2"


def test_a_vm_that_runs_twice_or_is_stopped_on_two_hypervisors_is_refused_naming_them():
    for running in (True, False):
        result = chosen(hypervisor("hv1", ("db.6c0bd1a2", running)), hypervisor("hv2", ("db.6c0bd1a2", running)))
        _hypervisor, conflict = result["db.6c0bd1a2"]
        assert ("is %s on hv1 and hv2" % ("running" if running else "stopped")) in conflict
        assert "cannot be told" in conflict
