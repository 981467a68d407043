"""The layers of module_utils, as the README's Layout draws them: each imports only those below it; each file is
private to the collection, says so, and holds one concern in about 400 lines at most."""

import ast
import os

import pytest

from support.paths import COLLECTIONS

PACKAGE = "ansible_collections.fleetbackup.qemu.plugins.module_utils"
ROOT = os.path.join(COLLECTIONS, *PACKAGE.split("."))
# Bottom to top.
LAYERS = ("_base", "_nbd", "_vm", "_views", "_repo", "_run")
PRIVATE = "# PRIVATE to the fleetbackup.qemu collection: no API, may change in any release."
MOST_LINES = 400


def files():
    found = []
    for directory, _dirs, names in os.walk(ROOT):
        found += [os.path.relpath(os.path.join(directory, name), ROOT) for name in names if name.endswith(".py")]
    return sorted(found)


def layers_imported(path):
    with open(os.path.join(ROOT, path)) as stream:
        tree = ast.parse(stream.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
            yield node.module[len(PACKAGE) + 1:].split(".")[0]


def test_every_file_is_in_a_layer():
    assert [path for path in files() if path.split("/")[0] not in LAYERS] == []


@pytest.mark.parametrize("path", files())
def test_a_layer_imports_only_the_layers_below_it(path):
    layer = path.split("/")[0]
    above = [other for other in set(layers_imported(path)) if LAYERS.index(other) > LAYERS.index(layer)]
    assert above == [], "%s (layer %s) imports from %s, above it" % (path, layer, ", ".join(sorted(above)))


@pytest.mark.parametrize("path", files())
def test_each_file_says_it_is_private_and_stays_small(path):
    with open(os.path.join(ROOT, path)) as stream:
        lines = stream.read().splitlines()
    assert PRIVATE in lines[:5]
    assert len(lines) <= MOST_LINES
