#!/bin/bash
# build.sh: build the test guest (a Debian kernel and a busybox initramfs), cached.
#
# Everything comes from Debian packages: the kernel from `apt-get download` of the package
# linux-image-cloud-amd64 depends on (the .deb is cached), its virtio modules (dependencies
# resolved from each module's .modinfo, so no kmod is needed), and from the host:
# busybox-static, iperf3 and socat with their shared libraries, plus this directory's /init
# and udhcpc event script.
#
# Output, in $PASSTD_GUEST_CACHE (default /var/cache/passtd-tests/guestvm):
#   vmlinuz             the kernel
#   initramfs.cpio.gz   the initramfs
#   kernel-version      e.g. 6.1.0-56-cloud-amd64
#   stamp               digest of every input; the guest is rebuilt only when it changes
#   kernel-pkg          the resolved kernel package name, until the apt package lists change
#   debs/               downloaded kernel packages
#
# Usage: build.sh [--force] [--quiet] [--print]
#   --force   rebuild even if the stamp matches
#   --quiet   no progress messages (errors are still printed)
#   --print   print the paths of vmlinuz and initramfs.cpio.gz, one per line
# Environment:
#   PASSTD_GUEST_CACHE        cache directory
#   PASSTD_GUEST_KERNEL_PKG   kernel package to use instead of resolving linux-image-cloud-amd64
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${PASSTD_GUEST_CACHE:-/var/cache/passtd-tests/guestvm}
MODULES="virtio_pci virtio_net virtio_console"
FORCE=0 QUIET=0 PRINT=0
for arg in "$@"; do
	case $arg in
	-f | --force) FORCE=1 ;;
	-q | --quiet) QUIET=1 ;;
	--print) PRINT=1 ;;
	-h | --help)
		sed -n '2,/^set /{/^#/{s/^# \{0,1\}//;p}}' "$0"
		exit 0
		;;
	*)
		echo "build.sh: unknown option $arg (see --help)" >&2
		exit 2
		;;
	esac
done

log() { [ "$QUIET" = 1 ] || echo "guestvm build: $*" >&2; }
die() {
	echo "guestvm build: error: $*" >&2
	exit 1
}

# A package is "there" when dpkg says it is installed: errors then name the package to install.
require_pkg() {
	local status
	status=$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)
	[ "$status" = installed ] || die "package $1 is not installed (apt-get install $1)"
}
command -v dpkg-query >/dev/null || die "dpkg-query missing: this script needs a Debian system"
for pkg in apt busybox-static iperf3 socat; do require_pkg "$pkg"; done
# busybox is the guest's /init shell and runs before any library is found: it must be static
# (the package busybox, not -static, also installs /bin/busybox).
BUSYBOX=/bin/busybox
if ldd "$BUSYBOX" >/dev/null 2>&1; then
	die "$BUSYBOX is dynamically linked (apt-get install busybox-static)"
fi
BINS="/usr/bin/iperf3 /usr/bin/socat"

mkdir -p "$CACHE/debs" 2>/dev/null ||
	die "cannot create $CACHE (set PASSTD_GUEST_CACHE to a writable directory)"
# One build at a time per cache: concurrent test processes wait for each other here.
exec 9>"$CACHE/.lock"
flock 9

# ---- the kernel package ----------------------------------------------------------------------
kernel_pkg() {
	if [ -n "${PASSTD_GUEST_KERNEL_PKG:-}" ]; then
		echo "$PASSTD_GUEST_KERNEL_PKG"
		return
	fi
	# apt-cache takes over a second when apt keeps no binary cache (as in Docker images), so
	# the answer is remembered until the package lists change.
	local lists memo=$CACHE/kernel-pkg sig pkg
	lists=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -printf '%p %s %T@\n' \
		2>/dev/null | sort | sha256sum | cut -c1-16)
	if [ -f "$memo" ] && read -r sig pkg <"$memo" && [ "$sig" = "$lists" ] && [ -n "$pkg" ]; then
		echo "$pkg"
		return
	fi
	pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
	[ -z "$pkg" ] || echo "$lists $pkg" >"$memo"
	echo "$pkg"
}
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ]; then
	# Offline or no package lists: fall back to the newest kernel already downloaded.
	KDEB=$(find "$CACHE/debs" -name 'linux-image-*-cloud-amd64_*.deb' | sort -V | tail -n1)
	[ -n "$KDEB" ] || die "cannot resolve the kernel package: 'apt-cache depends" \
		"linux-image-cloud-amd64' names none (run apt-get update, or set PASSTD_GUEST_KERNEL_PKG)"
else
	KDEB=$(find "$CACHE/debs" -name "${KPKG}_*.deb" | sort -V | tail -n1)
	if [ -z "$KDEB" ]; then
		log "downloading $KPKG"
		DL=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
		# _apt cannot write into a root-only cache: apt warns and downloads as root, harmlessly.
		if ! (cd "$DL" && apt-get download -q "$KPKG" >"$DL/log" 2>&1); then
			cat "$DL/log" >&2
			rm -rf "$DL"
			die "apt-get download $KPKG failed"
		fi
		mv "$DL"/*.deb "$CACHE/debs/"
		rm -rf "$DL"
		KDEB=$(find "$CACHE/debs" -name "${KPKG}_*.deb" | sort -V | tail -n1)
	fi
fi

# ---- the stamp: rebuild only when an input changed --------------------------------------------
# Host binaries and libraries are identified by path, size and mtime (a package upgrade changes
# them); our own scripts by content.
libs_of() { ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'; }
INPUT_FILES="$BUSYBOX"
for bin in $BINS; do INPUT_FILES="$INPUT_FILES $bin $(libs_of "$bin" | tr '\n' ' ')"; done
STAMP=$(
	{
		sha256sum "$HERE/build.sh" "$HERE/init" "$HERE/udhcpc.script"
		echo "$MODULES"
		# shellcheck disable=SC2086
		stat -L -c '%n %s %Y' "$KDEB" $INPUT_FILES
	} | sha256sum | cut -d' ' -f1
)
print_paths() { [ "$PRINT" = 0 ] || printf '%s\n%s\n' "$CACHE/vmlinuz" "$CACHE/initramfs.cpio.gz"; }
if [ "$FORCE" = 0 ] && [ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initramfs.cpio.gz" ] &&
	[ "$(cat "$CACHE/stamp" 2>/dev/null)" = "$STAMP" ]; then
	log "up to date: $CACHE"
	print_paths
	exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/passtd-guestvm-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

log "extracting $(basename "$KDEB")"
dpkg-deb -x "$KDEB" "$WORK/kernel"
# Debian 12's kernel packages ship /lib/modules; Debian 13's, merged-/usr, /usr/lib/modules
MODROOT=$WORK/kernel/lib/modules
[ -d "$MODROOT" ] || MODROOT=$WORK/kernel/usr/lib/modules
KVER=$(find "$MODROOT" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | head -n1)
[ -n "$KVER" ] || die "$KDEB has no /lib/modules nor /usr/lib/modules"
MODDIR=$MODROOT/$KVER
[ -f "$WORK/kernel/boot/vmlinuz-$KVER" ] || die "$KDEB has no /boot/vmlinuz-$KVER"

ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/udhcpc,proc,sys,dev,tmp,run,root,lib/modules,lib64}

# ---- modules, dependencies first ---------------------------------------------------------------
# modules.order maps a module name to its file; names use "_" where file names may use "-".
module_path() {
	awk -v want="$1" '{ n = $0; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n)
		if (n == want) { print; exit } }' "$MODDIR/modules.order"
}
is_builtin() { grep -q "/$1\.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
# Copies module $1 (uncompressed: busybox insmod cannot be relied on to decompress) into the
# initramfs after its dependencies and appends it to the load list.
add_module() {
	local name=$1 rel dst dep
	grep -qx "$name.ko" "$ROOT/lib/modules/load.list" 2>/dev/null && return 0
	rel=$(module_path "$name")
	if [ -z "$rel" ]; then
		is_builtin "$name" && return 0
		die "module $name is neither in $KVER's modules.order nor built in"
	fi
	dst=$ROOT/lib/modules/$name.ko
	# modules.order says .ko even where the package ships compressed modules (newer Debian).
	if [ -f "$MODDIR/$rel" ]; then
		cp "$MODDIR/$rel" "$dst"
	elif [ -f "$MODDIR/$rel.xz" ]; then
		command -v xz >/dev/null || die "$rel is xz-compressed (apt-get install xz-utils)"
		xz -dc "$MODDIR/$rel.xz" >"$dst"
	elif [ -f "$MODDIR/$rel.zst" ]; then
		command -v zstd >/dev/null || die "$rel is zstd-compressed (apt-get install zstd)"
		zstd -qdc "$MODDIR/$rel.zst" >"$dst"
	else
		die "module $name: $rel listed in modules.order but missing from $KDEB"
	fi
	# .modinfo is a list of NUL-terminated key=value strings; "depends=" names the modules
	# that must be loaded first.
	for dep in $(tr '\0' '\n' <"$dst" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
		add_module "$dep"
	done
	echo "$name.ko" >>"$ROOT/lib/modules/load.list"
}
for module in $MODULES; do add_module "$module"; done
log "modules: $(tr '\n' ' ' <"$ROOT/lib/modules/load.list")"

# ---- userland ----------------------------------------------------------------------------------
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
	[ "$applet" = busybox ] || ln -s busybox "$ROOT/bin/$applet"
done
for bin in $BINS; do
	cp -L "$bin" "$ROOT/usr/bin/"
	for lib in $(libs_of "$bin"); do
		# Keep the host's path (/lib/x86_64-linux-gnu/..., /lib64/ld-linux-x86-64.so.2):
		# ld.so and the binaries' interpreter field look exactly there.
		mkdir -p "$ROOT$(dirname "$lib")"
		cp -L "$lib" "$ROOT$lib"
	done
done

cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"
# No resolver configuration, ever: tests must not resolve names through anything.
: >"$ROOT/etc/resolv.conf"
echo "$KVER" >"$ROOT/etc/kernel-version"
install -m 0755 "$HERE/init" "$ROOT/init"
# The path busybox udhcpc uses by default, so a test script can run plain `udhcpc`.
install -m 0755 "$HERE/udhcpc.script" "$ROOT/etc/udhcpc/default.script"
# The kernel opens /dev/console for /init before anything is mounted; creating the node needs
# root, and without it /init simply starts without stdio until it mounts devtmpfs.
if [ "$(id -u)" = 0 ]; then
	mknod -m 600 "$ROOT/dev/console" c 5 1
	mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# ---- pack --------------------------------------------------------------------------------------
(cd "$ROOT" && find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) |
	gzip -6 >"$WORK/initramfs.cpio.gz"
cp "$WORK/kernel/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
mv -f "$WORK/vmlinuz" "$CACHE/vmlinuz"
mv -f "$WORK/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz"
echo "$KVER" >"$CACHE/kernel-version"
echo "$STAMP" >"$CACHE/stamp"
log "built $CACHE: kernel $KVER, initramfs $(du -h "$CACHE/initramfs.cpio.gz" | cut -f1)"
print_paths
