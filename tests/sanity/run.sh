#!/usr/bin/env bash
# make sanity: ansible-test sanity (offline), ansible-lint --profile production, antsibull-changelog lint,
# and the execution environment's introspection, on a snapshot of the working tree.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${VENV:-$root/.venv}
snapshot=$root/build/sanity/ansible_collections/fleetbackup/qemu

# ansible-test needs the collection at .../ansible_collections/<namespace>/<name>, in git.
rm -rf "$root/build/sanity"
mkdir -p "$snapshot"
(cd "$root" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$snapshot")
git -C "$snapshot" init -q
git -C "$snapshot" add -A
git -C "$snapshot" -c user.name=sanity -c user.email=sanity@localhost commit -q -m snapshot

# ansible-test downloads get-pip.py before anything else; it looks in its cache first.
pip_version=$("$venv/bin/python" -c 'import types
from ansible_test._internal.python_requirements import get_venv_packages
print(get_venv_packages(types.SimpleNamespace(version="3.11"))["pip"])')
mkdir -p ~/.ansible/test/cache
install -m 0644 "$root/tests/sanity/get_pip_standin.py" ~/.ansible/test/cache/get_pip_"${pip_version//./_}".py

echo "== ansible-test sanity"
(cd "$snapshot" && "$venv/bin/ansible-test" sanity --venv --python 3.11 --color no)

echo "== ansible-lint --profile production"
(cd "$snapshot" && "$venv/bin/ansible-lint" --profile production roles playbooks)

echo "== antsibull-changelog lint"
(cd "$snapshot" && "$venv/bin/antsibull-changelog" lint)

echo "== ansible-builder introspect --sanitize (the installed collection)"
introspected=$("$venv/bin/ansible-builder" introspect --sanitize "$root/build/collections")
echo "$introspected"
for needed in qemu.qmp python3-libnbd python3-xxhash python3-zstandard qemu-utils; do
    grep -q "$needed" <<<"$introspected" || { echo "the execution environment would lack $needed" >&2; exit 1; }
done
if grep -qiE 'pytest|ansible-lint|antsibull' <<<"$introspected"; then
    echo "development tools would end up in the execution environment" >&2
    exit 1
fi

echo "== ansible-builder create (a build context; building it needs a container engine)"
rm -rf "$root/build/ee-context"
(cd "$root/ee" && "$venv/bin/ansible-builder" create -f execution-environment.yml --context "$root/build/ee-context")
