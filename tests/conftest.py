"""Shared pytest setup: the installed collection and the test support code are importable."""

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "build", "collections"))
sys.path.insert(0, TESTS)
