"""Where the repository and the installed collection are."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
COLLECTIONS = os.path.join(ROOT, "build", "collections")
