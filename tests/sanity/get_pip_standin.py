"""A stand-in for pip's get-pip.py, which ansible-test downloads to bootstrap pip in the virtual environments
of its sanity tests; `make sanity` puts it where ansible-test looks first, so the tests run without that download.

It bootstraps pip with the interpreter's own ensurepip, then installs what ansible-test asked for (pip==VERSION and
its options) from the package index. get-pip.py's --no-setuptools and --no-wheel have no pip-install equivalent:
ensurepip installs neither package into a fresh virtual environment anyway.
"""

import subprocess
import sys

requested = [argument for argument in sys.argv[1:] if argument not in ("--no-setuptools", "--no-wheel")]
subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade", "--default-pip"], check=True)
subprocess.run([sys.executable, "-m", "pip", "install", *requested], check=True)
