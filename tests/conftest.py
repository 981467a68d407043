"""Shared pytest setup: the installed collection and the test support code are importable; short temp paths."""

import os
import shutil
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "build", "collections"))
sys.path.insert(0, TESTS)


def pytest_configure(config):
    # A unix socket path holds 107 bytes: pytest's own temp paths leave too little room for sockets under them.
    if not config.option.basetemp:
        config.option.basetemp = tempfile.mkdtemp(prefix="fbt", dir="/tmp")
        config.fleetbackup_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    if getattr(config, "fleetbackup_basetemp", None):
        shutil.rmtree(config.fleetbackup_basetemp, ignore_errors=True)
