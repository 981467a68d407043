# Each target installs what it needs on a fresh Debian 12 machine.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
COLLECTIONS := $(CURDIR)/build/collections
INSTALLED := $(COLLECTIONS)/ansible_collections/fleetbackup/qemu/MANIFEST.json
# Every program and file the tests, the demo and the modules use comes from these: tests/unit/test_host_packages.py
# checks it, naming a package that is missing.
APT_PACKAGES := qemu-system-x86 qemu-utils seabios ovmf python3-libnbd python3-xxhash python3-zstandard libnbd-bin python3-venv \
	openssh-server openssh-client openssl mount e2fsprogs mawk git shellcheck \
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt
# Only for make bench: the tool it is compared with.
BENCH_APT_PACKAGES := virtnbdbackup
# Stamps named by their lists: a package added to a list is installed by the next make.
APT_STAMP := build/.apt-$(shell echo $(APT_PACKAGES) | sha256sum | cut -c1-12)
APT_BENCH_STAMP := build/.apt-bench-$(shell echo $(BENCH_APT_PACKAGES) | sha256sum | cut -c1-12)
SOURCES := galaxy.yml $(shell find meta plugins roles playbooks -type f -not -name '*.pyc' 2>/dev/null)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS)
export ANSIBLE_PYTHON_INTERPRETER := $(PY)

.PHONY: all demo test sanity unit integration bench bench-checksum bench-storage deps install guest-kit clean apt-lists

all: test

# System packages: only what is missing, so a prepared machine needs no root.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages: $$missing"; \
		$$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$( [ $$(id -u) -eq 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

# libvirt-daemon alone creates no users; the tests' own libvirtd runs QEMU as libvirt-qemu, as Debian's does.
$(APT_STAMP):
	@mkdir -p build
	$(call apt_install,$(APT_PACKAGES))
	$$( [ $$(id -u) -eq 0 ] || echo sudo ) tests/support/libvirt-users.sh
	@touch $@

$(APT_BENCH_STAMP): $(APT_STAMP)
	$(call apt_install,$(BENCH_APT_PACKAGES))
	@touch $@

# libnbd's bindings live in Debian's python3, so the venv must come from it and see its site-packages.
$(VENV)/.ready: requirements-dev.txt $(APT_STAMP)
	/usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade -r requirements-dev.txt
	$(PY) -c 'import nbd, qemu.qmp, ansible, libvirt'
	@touch $@

deps: $(VENV)/.ready

$(INSTALLED): $(VENV)/.ready $(SOURCES)
	rm -rf build/dist && mkdir -p build/dist
	$(VENV)/bin/ansible-galaxy collection build --force --output-path build/dist .
	# --no-deps: community.crypto comes with the venv's ansible package, and Galaxy may be out of reach.
	$(VENV)/bin/ansible-galaxy collection install --no-deps --force -p $(COLLECTIONS) build/dist/fleetbackup-qemu-*.tar.gz
	@touch $@

install: $(INSTALLED)

# The tests' tiny real guest (kernel + busybox initramfs), in build/guest-kit; the script skips a current kit.
guest-kit:
	guest/build-kit.sh >/dev/null

demo: install guest-kit
	VENV=$(VENV) demo/run.sh

# ansible-test sanity, ansible-lint and antsibull-changelog lint, offline, plus the execution environment's files.
sanity: install
	VENV=$(VENV) tests/sanity/run.sh

test: install sanity guest-kit
	cd tests && $(PY) -m pytest -ra $(PYTEST_ARGS)

unit: install
	cd tests && $(PY) -m pytest -ra unit $(PYTEST_ARGS)

integration: install guest-kit
	cd tests && $(PY) -m pytest -ra integration $(PYTEST_ARGS)

bench: install $(APT_BENCH_STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/checksum_bench.py $(CHECKSUM_BENCH_ARGS)
	$(MAKE) bench-storage

# Only the checksum's part of make bench: the copy and the verify against nbdcopy, and the checksum's CPU share.
bench-checksum: install $(APT_BENCH_STAMP)
	$(PY) bench/checksum_bench.py $(CHECKSUM_BENCH_ARGS)

# The storage benches, on the 8 GiB ext4 copy of /usr (bench/usr_disk.py): compression's size and time, the
# encrypted full against the plain one, and the consolidation of a full and incrementals.
bench-storage: install $(APT_BENCH_STAMP)
	$(PY) bench/compress_bench.py $(STORAGE_BENCH_ARGS)
	$(PY) bench/encrypt_bench.py $(ENCRYPT_BENCH_ARGS)
	$(PY) bench/consolidate_bench.py

# The package lists, for the test that checks them.
apt-lists:
	@echo APT_PACKAGES=$(APT_PACKAGES)
	@echo BENCH_APT_PACKAGES=$(BENCH_APT_PACKAGES)

clean:
	rm -rf build .venv
