"""A role variable that a role passes on to a module option agrees with that option.

Its type, elements, choices and default, in the role's meta/argument_specs.yml and in its defaults/main.yml, are
the module's, as the module composes its argument spec. Which variable goes to which option is read from the
roles' task files: an option given a role variable alone (`{{ qemu_backup_cbw_timeout }}`), or that variable
or else nothing (`{{ X or omit }}`, `{{ X if ... else omit }}`); `module_defaults` for the group of the VM
modules passes the variable to each module of the group.
"""

import functools
import glob
import importlib
import os
import re
from unittest import mock

import pytest
import yaml
from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.common.parameters import DEFAULT_TYPE_VALIDATORS
from jinja2 import UndefinedError
from jinja2.nativetypes import NativeEnvironment

from support.paths import ROOT

COLLECTION = "fleetbackup.qemu."
MODULES = "ansible_collections.fleetbackup.qemu.plugins.modules."
# `{{ var }}`, `{{ var or omit }}` or `{{ var if condition else omit }}`.
PASSED_ON = re.compile(r"^\{\{\s*(?P<var>[a-z][a-z0-9_]*)\s*(?:(?P<or_omit>or omit)|if (?P<condition>.+) else omit)?"
                       r"\s*\}\}$")
# Where a role chooses another default than the module's, on purpose, and why.
ROLE_OWN_DEFAULTS = {
    "qemu_backup_progress_interval": "the role shows a line of progress per interval of a long run; the module "
                                     "alone never goes on in the background",
}
# A role's type that is narrower than the module's: every value it takes, the module takes as it is.
NARROWER_TYPES = {("int", "float")}
# What a role's template default may name that no role sets.
TEMPLATE_VARIABLES = {"inventory_hostname": "web1"}


class Passed:
    """One role variable passed on to one module option, by one task."""

    def __init__(self, role, var, module, option, omitted_when_empty, task):
        self.role, self.var, self.module, self.option, self.task = role, var, module, option, task
        self.omitted_when_empty = omitted_when_empty

    def __repr__(self):
        return "%s -> %s.%s" % (self.var, self.module, self.option)


def load_yaml(path):
    with open(path, encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def action_groups():
    return load_yaml(os.path.join(ROOT, "meta", "runtime.yml"))["action_groups"]


def passed_on(role, module, args, task):
    """What args (a module's arguments or its module_defaults) pass on of the role's own variables."""
    for option, value in (args or {}).items():
        match = PASSED_ON.match(value.strip()) if isinstance(value, str) else None
        if match and match.group("var").startswith(role + "_"):
            var = match.group("var")
            omitted = bool(match.group("or_omit")) or bool(re.search(r"\b%s\b" % var, match.group("condition") or ""))
            yield Passed(role, var, module, option, omitted, task)


def task_passes(role, tasks, where):
    """Every pass-on in a list of tasks, into blocks, module_defaults included."""
    for task in tasks or []:
        name = "%s: %s" % (where, task.get("name", "?"))
        for target, args in (task.get("module_defaults") or {}).items():
            modules = action_groups()[target[len("group/" + COLLECTION):]] if target.startswith("group/") else [
                target[len(COLLECTION):]]
            for module in modules:
                yield from passed_on(role, module, args, name)
        for key, args in task.items():
            if key.startswith(COLLECTION):
                yield from passed_on(role, key[len(COLLECTION):], args, name)
        for section in ("block", "rescue", "always"):
            yield from task_passes(role, task.get(section), where)


def all_passes():
    """Every pass-on of the roles, once each."""
    passes = {}
    for tasks_file in sorted(glob.glob(os.path.join(ROOT, "roles", "*", "tasks", "*.yml"))):
        role = tasks_file.split(os.sep)[-3]
        for passed in task_passes(role, load_yaml(tasks_file), os.path.relpath(tasks_file, ROOT)):
            passes.setdefault((passed.var, passed.module, passed.option, passed.omitted_when_empty), passed)
    return list(passes.values())


PASSES = all_passes()


class Captured(Exception):
    pass


def capture(_module, argument_spec, **_kwargs):
    raise Captured(argument_spec)


@functools.cache
def module_spec(module):
    """The argument spec that the module hands AnsibleModule, composed as it composes it."""
    main = importlib.import_module(MODULES + module).main
    with mock.patch.object(AnsibleModule, "__init__", capture), pytest.raises(Captured) as captured:
        main()
    return captured.value.args[0]


def role_option(role, var):
    options = load_yaml(os.path.join(ROOT, "roles", role, "meta", "argument_specs.yml"))["argument_specs"]["main"][
        "options"]
    assert var in options, "%s is passed on but not in roles/%s/meta/argument_specs.yml" % (var, role)
    return options[var]


def role_defaults(role):
    return load_yaml(os.path.join(ROOT, "roles", role, "defaults", "main.yml"))


def role_default(role, var):
    """(whether the role has a default, that default as a play sees it without other variables)."""
    if var not in role_defaults(role):
        return False, None
    value = role_defaults(role)[var]
    if isinstance(value, str) and "{{" in value:
        try:
            value = NativeEnvironment().from_string(value).render(**TEMPLATE_VARIABLES)
        except UndefinedError:  # a value the user must give (undef(hint=...))
            return False, None
    return True, value


def as_module_takes(value, option):
    """value as the module's type and elements make it."""
    value = DEFAULT_TYPE_VALIDATORS[option.get("type", "str")](value)
    if option.get("elements"):
        value = [DEFAULT_TYPE_VALIDATORS[option["elements"]](element) for element in value]
    return value


def test_the_pass_ons_are_read_from_every_role_that_calls_a_module():
    found = {(passed.var, passed.module, passed.option) for passed in PASSES}
    assert {("qemu_backup_cbw_timeout", "qemu_backup", "cbw_timeout"),
            ("qemu_backup_state_dir", "qemu_backup", "state_dir"),
            ("qemu_backup_tls_certificates", "qemu_backup", "tls_certificates"),
            ("qemu_restore_format", "qemu_backup_restore", "format"),
            ("qemu_verify_backups", "qemu_backup_verify", "backups"),
            ("qemu_drill_accel", "qemu_restore_drill", "accel")} <= found
    assert set(ROLE_OWN_DEFAULTS) <= {passed.var for passed in PASSES}


@pytest.mark.parametrize("passed", PASSES, ids=repr)
def test_a_passed_on_option_has_the_module_options_type_elements_and_choices(passed):
    spec = module_spec(passed.module)
    assert passed.option in spec, "%s passes %s to %s, which has no such option" % (passed.task, passed.var,
                                                                                    passed.module)
    option, role = spec[passed.option], role_option(passed.role, passed.var)
    module_type, role_type = option.get("type", "str"), role.get("type", "str")
    assert role_type == module_type or (role_type, module_type) in NARROWER_TYPES, (
        "%r: the role's type %s, the module's %s" % (passed, role_type, module_type))
    assert role.get("elements") == option.get("elements"), "%r: elements differ" % passed
    assert sorted(role.get("choices") or []) == sorted(option.get("choices") or []), "%r: choices differ" % passed


@pytest.mark.parametrize("passed", PASSES, ids=repr)
def test_a_passed_on_option_has_the_module_options_default(passed):
    option, role = module_spec(passed.module)[passed.option], role_option(passed.role, passed.var)
    if "default" in role:
        assert role_defaults(passed.role).get(passed.var) == role["default"], (
            "%s: its default in argument_specs.yml is not the one in defaults/main.yml" % passed.var)
    has_default, default = role_default(passed.role, passed.var)
    if not has_default:
        assert option.get("default") is None, "%r: the module has a default, the role none" % passed
        return
    if passed.omitted_when_empty and not default:
        return  # the module's own default then applies
    value = as_module_takes(default, option)
    if option.get("choices"):
        assert value in option["choices"], "%r: default %r is not one of the choices" % (passed, default)
    if option.get("default") is None:
        return
    if passed.var in ROLE_OWN_DEFAULTS:
        assert value != as_module_takes(option["default"], option), (
            "%s has the module's default now: remove it from ROLE_OWN_DEFAULTS" % passed.var)
    else:
        assert value == as_module_takes(option["default"], option), (
            "%r: the role's default %r, the module's %r" % (passed, default, option["default"]))
