#!/bin/bash
# Build the hcblk test guest: Debian's cloud kernel plus an uncompressed busybox
# initramfs that carries the virtio-blk modules, Debian's fio (with its whole
# shared-library closure) and qemu/guest/init.
#
#   qemu/build-guest.sh [OUTDIR]        # default: qemu/build
#
# Outputs OUTDIR/vmlinuz, OUTDIR/initramfs.cpio and OUTDIR/kernel-release.
# Only Debian apt is used as a network source. Re-running is a no-op (< 1 s) when
# the inputs (kernel package, fio/busybox versions, init script, this script)
# have not changed; HCBLK_GUEST_REBUILD=1 forces a rebuild.
#
# Environment:
#   HCBLK_GUEST_KERNEL_PKG  kernel package to use instead of the candidate of
#                           the linux-image-cloud-amd64 meta-package.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/build}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Tests and benchmarks may build the same OUTDIR concurrently: one at a time.
exec 9>"$out/.lock"
flock 9

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

# Virtio modules, in dependency order: busybox insmod does not resolve
# dependencies, so the guest loads them exactly in this order.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}

ensure_apt_lists() {
    if ! apt_lists_present; then
        log "apt lists missing: running apt-get update"
        apt-get update -qq || die "apt-get update failed (need network access to the Debian mirror)"
    fi
}

# Install host tools the build needs if they are missing (fresh Debian 12).
ensure_host_tools() {
    local want=() busybox_static=0
    if [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; then
        busybox_static=1 # ldd fails on static executables: that is what we need
    fi
    [ "$busybox_static" = 1 ] || want+=(busybox-static)
    command -v fio >/dev/null || want+=(fio)
    command -v cpio >/dev/null || want+=(cpio)
    command -v xz >/dev/null || want+=(xz-utils)
    command -v zstd >/dev/null || want+=(zstd)
    if [ "${#want[@]}" -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing ${want[*]}; install them or run as root"
        ensure_apt_lists
        log "installing ${want[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" \
            || die "apt-get install ${want[*]} failed"
    fi
}

# The newest cloud kernel apt would install: the candidate of the meta-package
# (apt already ranks versions by pin priority and version).
pick_kernel_pkg() {
    if [ -n "${HCBLK_GUEST_KERNEL_PKG:-}" ]; then
        echo "$HCBLK_GUEST_KERNEL_PKG"
        return
    fi
    local pkg
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')"
    [ -n "$pkg" ] || die "apt-cache knows no linux-image-cloud-amd64 (apt lists missing or no Debian main?)"
    echo "$pkg"
}

ensure_host_tools
ensure_apt_lists
kernel_pkg="$(pick_kernel_pkg)"
kernel_ver="$(apt-cache policy "$kernel_pkg" | awk '$1 == "Candidate:" {print $2}')"
[ -n "$kernel_ver" ] && [ "$kernel_ver" != "(none)" ] || die "no installable version of $kernel_pkg"

fio_bin="$(command -v fio)"
stamp_want="$(
    {
        echo "kernel $kernel_pkg $kernel_ver"
        dpkg-query -W fio busybox-static 2>/dev/null || true
        # Contents only: the same script run by another path is the same input.
        for f in "$fio_bin" /bin/busybox "$here/guest/init" "${BASH_SOURCE[0]}"; do
            sha256sum <"$f"
        done
    } | sha256sum | cut -d' ' -f1
)"
if [ "${HCBLK_GUEST_REBUILD:-0}" != 1 ] && [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp_want" ] \
    && [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio" ]; then
    log "up to date: $out ($kernel_pkg $kernel_ver)"
    exit 0
fi

work="$out/work"
rm -rf "$work" "$out/stamp"
mkdir -p "$work/deb" "$work/kernel"

# --- kernel -------------------------------------------------------------------
log "downloading $kernel_pkg=$kernel_ver"
# apt-get download writes into the current directory; _apt cannot write into
# root-owned dirs, which only costs a warning about an unsandboxed download.
(cd "$work/deb" && apt-get download -qq "$kernel_pkg=$kernel_ver" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
deb="$(ls "$work/deb"/*.deb 2>/dev/null | head -n1)"
[ -n "$deb" ] || die "apt-get download $kernel_pkg produced no .deb"
dpkg -x "$deb" "$work/kernel"
vmlinuz="$(ls "$work/kernel"/boot/vmlinuz-* | head -n1)"
release="${vmlinuz##*/vmlinuz-}"
moddir="$(ls -d "$work/kernel"/lib/modules/"$release" 2>/dev/null || ls -d "$work/kernel"/usr/lib/modules/"$release")"
[ -d "$moddir" ] || die "no module directory for $release in $deb"

# --- initramfs tree ---------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules/hcblk,lib64,usr/bin}
cp /bin/busybox "$root/bin/busybox"
# Applet links are made in the guest by `busybox --install -s`; sh is needed first.
ln -s busybox "$root/bin/sh"

for m in "${modules[@]}"; do
    f="$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n1)"
    if [ -z "$f" ]; then
        # Built into this kernel: nothing to load.
        grep -qE "/$m\.ko$" "$moddir/modules.builtin" 2>/dev/null \
            || die "module $m is neither a file nor built in to $release"
        log "module $m is built in"
        continue
    fi
    # busybox insmod reads plain ELF only: decompress here.
    case "$f" in
        *.ko) cp "$f" "$root/lib/modules/hcblk/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$root/lib/modules/hcblk/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/hcblk/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$root/lib/modules/hcblk/$m.ko" ;;
    esac
    echo "$m" >>"$root/lib/modules/hcblk/order"
done
touch "$root/lib/modules/hcblk/order"

# fio and every library it links, at the same paths as on the host, plus the
# dynamic loader. ldd lists the full transitive closure.
cp "$fio_bin" "$root/usr/bin/fio"
ldd "$fio_bin" | awk '/=> \// {print $3} /^\t\// {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
loader="$(ldd "$fio_bin" | awk '/ld-linux/ {print $1}')"
[ -e "$root$loader" ] || die "dynamic loader $loader not copied"

cp "$here/guest/init" "$root/init"
chmod 0755 "$root/init"

# --- cpio ---------------------------------------------------------------------------
# Uncompressed newc: the kernel unpacks it without a decompressor, which is
# measurably faster under TCG than gzip/xz.
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) >"$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
cp "$vmlinuz" "$out/vmlinuz"
echo "$release" >"$out/kernel-release"
rm -rf "$work"
echo "$stamp_want" >"$out/stamp"
log "built $out: kernel $release ($kernel_pkg $kernel_ver), initramfs $(du -h "$out/initramfs.cpio" | cut -f1)"
