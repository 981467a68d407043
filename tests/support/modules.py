"""Run the collection's modules as Ansible does: a separate process fed its arguments as JSON."""

import json
import os
import subprocess
import sys

from support.paths import COLLECTIONS, ROOT, TESTS


class ModuleResult(dict):
    @property
    def failed(self):
        return bool(self.get("failed"))


def run_module(module_name, check_mode=False, **args):
    args = {key: value for key, value in args.items() if value is not None}
    if check_mode:
        args["_ansible_check_mode"] = True
    process = subprocess.run(
        [sys.executable, "-m", "ansible_collections.fleetbackup.qemu.plugins.modules." + module_name],
        input=json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=COLLECTIONS), timeout=600, check=False)
    try:
        result = ModuleResult(json.loads(process.stdout))
    except ValueError:
        raise AssertionError("module %s printed no JSON (rc %d): %s %s"
                             % (module_name, process.returncode, process.stdout[-2000:], process.stderr[-2000:]))
    assert (process.returncode != 0) == result.failed, result
    return result


def has_action(module_name):
    """Whether the module is an action, which runs in the controller's process (plugins/action)."""
    return os.path.exists(os.path.join(COLLECTIONS, "ansible_collections", "fleetbackup", "qemu", "plugins", "action",
                                       module_name + ".py"))


def run_action(module_name, check_mode=False, env=None, **args):
    """(result, stdout and stderr) of an action, run as an ad hoc `ansible localhost -m` runs it; env: more of it."""
    command = [ansible_bin("ansible"), "localhost", "-m", "fleetbackup.qemu." + module_name, "-a", json.dumps(args)]
    if check_mode:
        command.append("--check")
    process = subprocess.run(command, env=dict(ansible_env(), ANSIBLE_LOAD_CALLBACK_PLUGINS="true",
                                               ANSIBLE_STDOUT_CALLBACK="json", **(env or {})),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    try:
        [task] = json.loads(process.stdout)["plays"][0]["tasks"]
    except ValueError:
        raise AssertionError("ansible printed no JSON (rc %d): %s" % (process.returncode, process.stderr[-2000:]))
    return ModuleResult(task["hosts"]["localhost"]), process.stdout + process.stderr


def ansible_env():
    return dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=COLLECTIONS,
                ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_LOCALHOST_WARNING="false",
                ANSIBLE_INVENTORY_UNPARSED_WARNING="false")


def results_env(results_file):
    """ansible_env() with our results callback writing to results_file."""
    return dict(ansible_env(), RESULTS_FILE=results_file, ANSIBLE_CALLBACKS_ENABLED="results_file",
                ANSIBLE_CALLBACK_PLUGINS=os.path.join(os.path.dirname(os.path.abspath(__file__)), "callback_plugins"))


def ansible_bin(tool):
    return os.path.join(os.path.dirname(sys.executable), tool)


def run_playbook(playbook, inventory, results_file, extra_vars=None, check=False, forks=5, at_task=None, more_args=()):
    """ansible-playbook with our results callback; returns (rc, results dict, output).

    at_task: (task name, argv), a command to run when that task first starts. more_args: more arguments, e.g. -vvv.
    """
    command = [ansible_bin("ansible-playbook"), playbook, "-i", inventory, "-f", str(forks), *more_args]
    if extra_vars:
        command += ["-e", json.dumps(extra_vars)]
    if check:
        command.append("--check")
    env = results_env(results_file)
    if at_task:
        env.update(AT_TASK=at_task[0], AT_TASK_COMMAND=json.dumps(at_task[1]))
    process = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900, check=False)
    # ansible-playbook that stops before its recap (an error in the playbook) writes no results: say why.
    assert os.path.exists(results_file), process.stdout.decode(errors="replace")[-5000:]
    with open(results_file) as stream:
        return process.returncode, json.load(stream), process.stdout.decode(errors="replace")


def support_command(code):
    """argv that runs Python code with the tests' support package importable, for at_task."""
    return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); %s" % (TESTS, code)]
