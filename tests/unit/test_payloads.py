"""A module's payload carries only the module_utils it imports: the copy engine goes only where a copy runs.

Ansible's recursive finder puts into a module's AnsiballZ payload every module_util that the module imports,
and every one that those import; this follows the same import lines.
"""

import ast
import os

import pytest

from support.paths import COLLECTIONS

PACKAGE = "ansible_collections.fleetbackup.qemu.plugins"
PLUGINS = os.path.join(COLLECTIONS, *PACKAGE.split("."))
MODULES = sorted(name[:-3] for name in os.listdir(os.path.join(PLUGINS, "modules")) if name.endswith(".py"))
ENGINE = "module_utils/_nbd/engine.py"


def _file_of(dotted):
    """The collection file that a dotted name imports, or None (a package, a name in a module, not ours)."""
    if not dotted.startswith(PACKAGE + "."):
        return None
    path = os.path.join(PLUGINS, *dotted[len(PACKAGE) + 1:].split(".")) + ".py"
    return os.path.relpath(path, PLUGINS) if os.path.isfile(path) else None


def _imports(relative_path):
    with open(os.path.join(PLUGINS, relative_path)) as stream:
        tree = ast.parse(stream.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            # "from package import module" imports the module, "from module import name" the module itself.
            names = [node.module] + ["%s.%s" % (node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        yield from filter(None, map(_file_of, names))


def payload(module):
    """The module_utils files that module's payload carries."""
    seen = set()
    todo = ["modules/%s.py" % module]
    while todo:
        for path in _imports(todo.pop()):
            if path not in seen:
                seen.add(path)
                todo.append(path)
    return seen


@pytest.mark.parametrize("module", MODULES)
def test_only_the_modules_that_copy_carry_the_copy_engine(module):
    # The repository module consolidates: it writes merged images with the engine.
    assert (ENGINE in payload(module)) == (module in ("qemu_backup", "qemu_backup_copy", "qemu_backup_verify",
                                                      "qemu_backup_repository"))


VIEWS = "module_utils/_views/catalog.py"


@pytest.mark.parametrize("module", MODULES)
def test_only_the_modules_that_start_stop_or_describe_backups_carry_the_views(module):
    carriers = ("qemu_backup", "qemu_backup_start", "qemu_backup_stop", "qemu_backup_info")
    assert (VIEWS in payload(module)) == (module in carriers)


def test_the_module_base_checks_for_libnbd_and_xxhash_without_the_nbd_client():
    assert payload("qemu_backup_copy_status") == {
        "module_utils/_base/errors.py", "module_utils/_base/module_base.py", "module_utils/_base/options.py",
        "module_utils/_base/private_state.py", "module_utils/_base/processes.py", "module_utils/_base/libnbd.py",
        "module_utils/_base/fast_hash.py", "module_utils/_nbd/progress.py"}
