"""Every module documents itself, and fails clearly without its libraries."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from support.modules import ansible_bin, ansible_env
from support.paths import COLLECTIONS

MODULES = sorted(os.path.basename(path)[:-3] for path in glob.glob(
    os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "plugins", "modules", "*.py")))


def test_all_modules_are_there():
    assert MODULES == ["qemu_backup", "qemu_backup_copy", "qemu_backup_copy_status", "qemu_backup_info", "qemu_backup_report",
                       "qemu_backup_repository", "qemu_backup_restore", "qemu_backup_start", "qemu_backup_stop",
                       "qemu_backup_verify", "qemu_checkpoint", "qemu_restore_drill", "qemu_vms_info"]


ACTIONS = sorted(os.path.basename(path)[:-3] for path in glob.glob(
    os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "plugins", "action", "*.py")))


def test_the_actions_are_modules():
    assert ACTIONS == ["qemu_backup_report"] and set(ACTIONS) <= set(MODULES)


@pytest.mark.parametrize("action", ACTIONS)
def test_an_action_takes_the_options_its_module_documents(action):
    plugins = "ansible_collections.fleetbackup.qemu.plugins."
    documented = yaml.safe_load(importlib.import_module(plugins + "modules." + action).DOCUMENTATION)["options"]
    declared = importlib.import_module(plugins + "action." + action).ARGUMENT_SPEC
    keys = ("type", "elements", "required", "default")
    assert {name: {key: option[key] for key in keys if option.get(key) not in (None, False)}
            for name, option in documented.items()} == {
        name: {key: spec[key] for key in keys if spec.get(key) not in (None, False)} for name, spec in declared.items()}


ROLES = ["qemu_backup", "qemu_hypervisor", "qemu_restore", "qemu_verify", "qemu_drill"]


@pytest.mark.parametrize("plugin_type,names", [("module", MODULES), ("filter", ["run_summary", "summary_line"]),
                                               ("role", ROLES)])
def test_ansible_doc_renders_every_plugin(plugin_type, names):
    process = subprocess.run([ansible_bin("ansible-doc"), "-t", plugin_type, "--json"]
                             + ["fleetbackup.qemu." + name for name in names],
                             env=ansible_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             check=False)
    assert process.returncode == 0 and "WARNING" not in process.stderr, process.stderr
    docs = json.loads(process.stdout)
    assert sorted(docs) == sorted("fleetbackup.qemu." + name for name in names)
    if plugin_type == "module":
        for name, doc in docs.items():
            assert doc["examples"].strip() and doc["return"], name
            assert doc["doc"]["attributes"]["check_mode"]["support"] == "full", name


@pytest.mark.parametrize("module,args,hidden,words", [
    ("qemu_backup_copy", {"src": "nbd+unix:///x?socket=/x", "dest": "TMP/x", "state_dir": "TMP/state"}, ["nbd"],
     "python3-libnbd"),
    ("qemu_backup_verify", {"repository": "/x"}, ["nbd"], "python3-libnbd"),
    ("qemu_backup_copy", {"src": "nbd+unix:///x?socket=/x", "dest": "TMP/x", "state_dir": "TMP/state"}, ["xxhash"],
     "apt install python3-xxhash"),
    ("qemu_backup", {"qmp_socket": "/x", "repository": "/x", "vm": "x"}, ["xxhash"], "apt install python3-xxhash"),
    ("qemu_backup_copy", {"src": "nbd+unix:///x?socket=/x", "dest": "TMP/x", "state_dir": "TMP/state",
                          "compress": "zstd"}, ["zstandard"], "apt install python3-zstandard"),
    ("qemu_backup", {"qmp_socket": "/x", "repository": "/x", "vm": "x", "compress": "zstd"}, ["zstandard"],
     "apt install python3-zstandard"),
    ("qemu_backup_start", {"qmp_socket": "/x", "backup_id": "x"}, ["qemu", "qemu.qmp"], "pip install qemu.qmp"),
    ("qemu_backup_start", {"domain": "web1", "backup_id": "x"}, ["libvirt"], "apt install python3-libvirt"),
    ("qemu_backup_restore", {"repository": "/x", "vm": "x", "dest": "/x", "define_domain": True}, ["libvirt"],
     "apt install python3-libvirt"),
])
def test_a_missing_library_fails_with_what_to_install(module, args, hidden, words, tmp_path):
    args = {"ANSIBLE_MODULE_ARGS": {key: value.replace("TMP", str(tmp_path)) if isinstance(value, str) else value
                                    for key, value in args.items()}}
    # A None entry in sys.modules makes its import fail, as on a host without the package.
    hide = "import sys, runpy; sys.modules.update(dict.fromkeys(%r)); runpy.run_module(%r, run_name='__main__')" % (
        hidden, "ansible_collections.fleetbackup.qemu.plugins.modules." + module)
    process = subprocess.run([sys.executable, "-c", hide], input=json.dumps(args).encode(),
                             stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=COLLECTIONS), check=False)
    result = json.loads(process.stdout)
    assert process.returncode == 1 and result["failed"]
    assert words in result["msg"], result["msg"]
