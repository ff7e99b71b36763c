#!/usr/bin/env bash
# Installs what building, testing and benchmarking hcblk needs on Debian 12 (bookworm), as root.
# Idempotent: installs only what is missing.
set -euo pipefail

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: $0 must run as root (apt-get, hugepages, network namespaces)" >&2
        exit 1
    fi
}
need_root

export DEBIAN_FRONTEND=noninteractive

# qemu-system-x86 must come from bookworm-backports: bookworm's 7.2 would remove the
# preinstalled qemu-utils 10.0, which holds qemu-storage-daemon (our baseline server).
BACKPORTS=/etc/apt/sources.list.d/hcblk-bookworm-backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$BACKPORTS" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

PACKAGES=(
    # io_uring, verbs transport build (rdma-sys bindgen), etcd-client build
    pkg-config clang libclang-dev cmake libibverbs-dev librdmacm-dev libnl-3-dev libnl-route-3-dev
    protobuf-compiler
    # test guest: kernel unpacked from Debian's package, busybox initramfs, fio inside and outside
    busybox-static cpio fio xz-utils zstd
    # multi-host tests in network namespaces (nftables, iptables NFQUEUE for delay where the kernel has no netem, for partitions and loss),
    # cluster metadata (tests start their own etcd; the packaged service is not used)
    iproute2 nftables iptables etcd-server etcd-client
    # benchmark chart
    python3-matplotlib
    # packaging/ checks: systemd-analyze verify of the unit, systemd-tmpfiles of the entry (both
    # work offline, with or without systemd as PID 1); xmllint for the libvirt domain XML
    systemd libxml2-utils
)
# libvirt test (tests/tests/libvirt.rs starts its own libvirtd): without recommends, which
# would pull in xen, lvm, dnsmasq and more that nothing here uses.
LIBVIRT_PACKAGES=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
missing_libvirt=()
for p in "${LIBVIRT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_libvirt+=("$p")
done
need_qemu=0
command -v qemu-system-x86_64 >/dev/null || need_qemu=1
command -v qemu-storage-daemon >/dev/null || need_qemu=1

if [[ ${#missing[@]} -gt 0 || ${#missing_libvirt[@]} -gt 0 || $need_qemu -eq 1 || ! -d /var/lib/apt/lists/partial ]]; then
    apt-get update -q
fi
if [[ $need_qemu -eq 1 ]]; then
    apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils
fi
if [[ ${#missing[@]} -gt 0 ]]; then
    apt-get install -y -q "${missing[@]}"
fi
if [[ ${#missing_libvirt[@]} -gt 0 ]]; then
    # After qemu: libvirt must find the backports QEMU in place, not pull bookworm's.
    apt-get install -y -q --no-install-recommends "${missing_libvirt[@]}"
fi

# cargo-fuzz drives the fuzz targets (with RUSTC_BOOTSTRAP=1 on the stable toolchain).
if ! command -v cargo-fuzz >/dev/null && [[ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]]; then
    cargo install --locked cargo-fuzz
fi
