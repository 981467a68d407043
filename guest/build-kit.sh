#!/usr/bin/env bash
# Builds the tests' tiny real Linux guest from Debian 12 packages, and prints the kit's directory.
#
#   guest/build-kit.sh [KIT]   KIT defaults to $FLEETBACKUP_GUEST_KIT, else build/guest-kit in the repository
#
#   KIT/vmlinuz        Debian's cloud kernel (the versioned package linux-image-cloud-amd64 depends on)
#   KIT/initramfs.gz   busybox-static, guest/init.sh as /init, the virtio-blk, virtio-scsi and virtio-console modules
#   KIT/disk.qcow2     a disk that boots through the firmware, with qemu-guest-agent: see guest/build-disk.sh
#   KIT/packages       the Debian packages it was built from
#   KIT/stamp          sha256 of the scripts in guest/: a kit with a matching stamp is not rebuilt
#
# The kit is built in a temporary directory and renamed into place, so a killed build leaves no kit
# rather than half a one. Nothing is installed: the packages are downloaded and unpacked (installing
# busybox-static would remove Debian's busybox package, which it conflicts with). Building the disk
# mounts its file system, which needs root (or sudo).
#
# Boot it under TCG (a booting guest hangs under the paravirtual /dev/kvm of these machines):
#   qemu-system-x86_64 -nodefaults -display none -machine q35,accel=tcg -m 256 \
#     -kernel KIT/vmlinuz -initrd KIT/initramfs.gz -append "console=ttyS0 quiet panic=-1" -no-reboot \
#     -chardev socket,id=ser0,path=DIR/serial.sock,server=on,wait=off -serial chardev:ser0 \
#     -blockdev ... -device virtio-blk-pci,drive=...,id=vda [-device virtio-blk-pci,drive=...,id=vdb] ...
# virtio-blk disks appear as vda, vdb, ... in device order; scsi-hd disks on a virtio-scsi-pci as sda, ...
# (sd_mod probes asynchronously, so with several scsi disks their order is not guaranteed).
#
# Guest protocol, on the serial console: the host sends one command per line; the guest answers with
# lines that start with "FBG ". Any other line is kernel or tool noise: skip it. Commands run one at a
# time, in the order sent; a command sent while another runs waits for it.
#   ping                    FBG READY [DISK...]
#       The drivers are loaded; the disks follow, vd* then sd* ("FBG READY vda vdb"). The guest also
#       prints this once at boot, unprompted; a client that connects later (wait=off drops output while
#       no client is connected) sends ping and waits for the line, so no client ever sleeps.
#   overwrite DEV MIB BYTE  FBG DONE overwrite STATUS BYTES
#       Sets the first MIB MiB of /dev/DEV to BYTE (0-255), in whole 1 MiB O_DIRECT writes.
#       STATUS is dd's exit status, BYTES the bytes written in whole MiB blocks.
#   records N               FBG RECORDS STARTED, then FBG DONE records N
#       Record i (0 <= i < N) is one 4096-byte O_DIRECT write of "REC %08d\n" % i, zero padded, at
#       offset (i // 2) * 4096 of vda when i is even, of vdb when i is odd. Each write completes before
#       the next starts, so at any moment the disks hold records 0..k-1 for some k, and at most record k
#       is being written. N may be larger than the VM will ever live: nothing of size N is precomputed.
#   sync                    FBG DONE sync STATUS
#       sync, then fdatasync on every disk: each device gets a flush.
#   workload ARGS...        FBG DONE workload STATUS WORDS...
#       Only on the guest disk (build-disk.sh): runs fbg-workload ARGS (guest/workload.sh), as the agent's
#       guest-exec would; STATUS is its exit status, WORDS its output and errors, joined on one line.
#   anything else           FBG ERROR unknown COMMAND   (bad arguments: FBG ERROR usage ...)
set -euo pipefail

guest_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kit=$(realpath -m "${1:-${FLEETBACKUP_GUEST_KIT:-$(dirname "$guest_dir")/build/guest-kit}}")
# Dependencies first; virtio_scsi after sd_mod, so that its disks are ready when its insmod returns.
# virtio_console: the guest agent's channel, on the disk.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console
         scsi_common scsi_mod sd_mod virtio_scsi)
stamp=$(cat "$guest_dir"/{build-kit.sh,build-disk.sh,init.sh,workload.sh} | sha256sum | cut -d' ' -f1)

say() {
    echo "build-kit: $*" >&2
}

is_current() {
    [ "$(cat "$kit/stamp" 2>/dev/null)" = "$stamp" ] && [ -s "$kit/vmlinuz" ] && [ -s "$kit/initramfs.gz" ] &&
        [ -s "$kit/disk.qcow2" ]
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

kernel_package() {
    apt-cache depends linux-image-cloud-amd64 |
        sed -n 's/^  Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | grep .
}

download_packages() {
    local kernel
    kernel=$(kernel_package) &&
        # Root's downloads drop to the _apt user, who cannot write in our private directory.
        (cd "$work/debs" && apt-get download -q -o APT::Sandbox::User=root busybox-static qemu-guest-agent extlinux "$kernel" >&2)
}

mkdir -p "$(dirname "$kit")"
exec 9>"$kit.lock"
flock 9
if is_current; then
    echo "$kit"
    exit 0
fi
if [ -e "$kit" ] && [ ! -f "$kit/stamp" ]; then
    say "$kit exists and is no guest kit: not replacing it"
    exit 1
fi

started=$SECONDS
rm -rf "$kit".build.*  # left by killed builds: we hold the lock, so no build is running
work=$(mktemp -d "$kit.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/debs" "$work/unpacked" "$work/kit"

# Fresh machines have no package lists, and old lists name packages the mirror has since dropped.
if ! download_packages; then
    say "updating the package lists, then trying again"
    as_root apt-get update -q >&2
    download_packages
fi
for package in busybox-static qemu-guest-agent extlinux; do
    dpkg-deb -x "$work/debs/${package}"_*.deb "$work/unpacked/$package"
done
dpkg-deb -x "$work"/debs/linux-image-*.deb "$work/unpacked/kernel"
busybox=$work/unpacked/busybox-static/bin/busybox

root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list | grep -vx busybox); do
    ln -s busybox "$root/bin/$applet"
done
install -m 755 "$guest_dir/init.sh" "$root/init"
for module in "${modules[@]}"; do
    path=$(find "$work"/unpacked/kernel/lib/modules/*/kernel -name "$module.ko" -print -quit)
    # Debian 12 ships modules uncompressed (CONFIG_MODULE_COMPRESS_NONE), as the init's insmod expects.
    [ -n "$path" ] || { say "$module.ko is not in the kernel package"; exit 1; }
    cp "$path" "$root/lib/modules/"
    echo "$module" >>"$root/lib/modules/load-order"
done
(cd "$root" && find . | "$busybox" cpio -o -H newc -R 0:0) | gzip -9n >"$work/kit/initramfs.gz"

cp "$work"/unpacked/kernel/boot/vmlinuz-* "$work/kit/vmlinuz"
for deb in "$work"/debs/*.deb; do
    # shellcheck disable=SC2016  # dpkg-deb expands ${Package}, not the shell
    dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb"
done >"$work/kit/packages"
"$guest_dir/build-disk.sh" "$work"
echo "$stamp" >"$work/kit/stamp"

if [ -e "$kit" ]; then
    mv "$kit" "$work/old-kit"  # an outdated kit, deleted with the work directory
fi
mv "$work/kit" "$kit"
say "built $kit in $((SECONDS - started)) s from $(paste -sd' ' "$kit/packages")"
echo "$kit"
