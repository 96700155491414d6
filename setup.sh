#!/bin/bash
# setup.sh: install passtd on a Debian 12 or 13 machine (as root), then run the demo.
#
#   ./setup.sh             install everything, then `passtd demo`
#   ./setup.sh --no-demo   install only (what ./run-tests.sh and CI use)
#
# What it does (idempotent; safe to run again after `git pull`):
#   - apt packages: qemu (the demo's network hub and the test VMs), iproute2, busybox,
#     socat, iperf3, the reference passt (benchmark yardstick), dbus, systemd-container,
#     libvirt, and the headers that pystemd and libvirt-python compile against
#   - a virtualenv in /opt/passtd/venv (Debian's python3) with this checkout installed,
#     and /usr/local/bin/passtd, /usr/local/bin/passtctl
#   - systemd units in /usr/local/lib/systemd/system, the D-Bus policy in
#     /usr/share/dbus-1/system.d, /etc/passtd.yaml (kept if it exists), the libvirt hook
#     in /etc/libvirt/hooks/qemu.d/ (run by the venv's python; libvirtd finds a new hook
#     only when it starts), and the `passtd` group that may connect to the sockets
#   - the system user `passtd` the instances run as (not a member of that group)
#   - the manual pages (man passtd, passtctl, passtd.yaml, passtd-libvirt), passtctl's bash
#     completion
set -euo pipefail
cd "$(dirname "$0")"
SRC=$(pwd)
PREFIX=${PASSTD_PREFIX:-/opt/passtd}
VENV=$PREFIX/venv
DEMO=1
for arg in "$@"; do
	case $arg in
	--no-demo) DEMO=0 ;;
	-h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
	esac
done
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root" >&2; exit 1; }
say() { echo "setup: $*"; }

APT_PACKAGES=(
	python3 python3-venv python3-dev gcc pkg-config libsystemd-dev libvirt-dev
	iproute2 procps kmod qemu-system-x86 busybox-static socat iperf3 passt
	dbus systemd-container libvirt-daemon-system libvirt-clients
	ca-certificates curl tshark xz-utils man-db bash-completion polkitd
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
	say "creating $VENV"
	mkdir -p "$PREFIX"
	/usr/bin/python3 -m venv "$VENV"
fi
say "installing passtd from $SRC into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null
"$VENV/bin/pip" install -q --disable-pip-version-check "$SRC[systemd,libvirt,test]"
# the checkout itself, rebuilt every time so the installed copy is this checkout, with the
# native parts compiled if they can be (setup.py: passtd/engine/_csum.c, _tcp_run.c and
# _tcp_buf.c, and the engine's modules by mypyc, which comes with mypy: hence this venv's,
# not an isolated build's); about two minutes on two cores
"$VENV/bin/pip" install -q --disable-pip-version-check "setuptools>=77"
say "compiling the engine (mypyc) and installing it"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall \
	--no-build-isolation "$SRC"
# ...and compiled in the checkout as well, for what runs from it (the tests, the labs)
if ! (cd "$SRC" && "$VENV/bin/python" -W ignore setup.py -q build_ext --inplace --parallel 2 \
		>/dev/null); then
	say "warning: the native parts did not build: passtd runs its pure-Python paths"
fi
ln -sf "$VENV/bin/passtd" /usr/local/bin/passtd
ln -sf "$VENV/bin/passtctl" /usr/local/bin/passtctl

getent group passtd >/dev/null || groupadd --system passtd
# the instances' identity (passtd@.service User=passtd), Debian's way for system users:
# primary group nogroup, deliberately not in group passtd (no access to other VMs' sockets)
getent passwd passtd >/dev/null || useradd --system --gid nogroup --no-create-home \
	--home-dir /nonexistent --shell /usr/sbin/nologin --comment "passtd instances" passtd
if getent passwd libvirt-qemu >/dev/null; then
	usermod -a -G passtd libvirt-qemu  # qemu under libvirt connects to /run/passtd/*.sock
fi

UNITDIR=/usr/local/lib/systemd/system
install -d "$UNITDIR"
install -m 0644 units/passtd@.socket units/passtd@.service "$UNITDIR/"
install -D -m 0644 dbus/org.passtd.Passtd1.conf /usr/share/dbus-1/system.d/org.passtd.Passtd1.conf
# who may change forwards besides root: polkit decides (passtd/dbus_auth.py); the rules
# example (a group that may, without a password) goes with the documentation
install -D -m 0644 polkit/org.passtd.Passtd1.policy /usr/share/polkit-1/actions/org.passtd.Passtd1.policy
install -D -m 0644 polkit/50-passtd.rules.example /usr/local/share/doc/passtd/50-passtd.rules.example
[ -e /etc/passtd.yaml ] || install -m 0644 etc/passtd.yaml /etc/passtd.yaml
for page in man/*.[1-8]; do  # man passtd, passtctl, passtd.yaml, passtd-libvirt
	install -D -m 0644 "$page" "/usr/local/share/man/man${page##*.}/$(basename "$page")"
done
mandb -q 2>/dev/null || true
install -D -m 0644 completion/passtctl.bash /usr/share/bash-completion/completions/passtctl
install -d -m 0755 /etc/passtd.d
if [ -d libvirt-hook ] && [ -e libvirt-hook/passtd ]; then
	# the hook runs under this venv's python (its first line says which)
	HOOK=/etc/libvirt/hooks/qemu.d/passtd
	hook_is_new=0
	[ -e "$HOOK" ] || hook_is_new=1
	install -d -m 0755 /etc/libvirt/hooks/qemu.d
	sed "1s|^#!.*|#!$VENV/bin/python3 -I|" libvirt-hook/passtd > "$HOOK.new"
	chmod 0755 "$HOOK.new"
	mv -f "$HOOK.new" "$HOOK"
	# libvirtd looks for hooks when it starts only: tell it, or tell the admin
	if [ "$hook_is_new" = 1 ] && [ -d /run/systemd/system ]; then
		for daemon in libvirtd.service virtqemud.service; do
			if systemctl -q is-active "$daemon"; then
				say "$daemon runs without passtd's hook: restart it (running VMs stay up):"
				say "  systemctl restart $daemon"
			fi
		done
	fi
fi
# Guest pings use unprivileged ping sockets: the service's group (nogroup) must be within
# net.ipv4.ping_group_range; opened for it only where nobody set the range (the script).
scripts/ping-group-range.sh "$(getent group nogroup | cut -d: -f3)"
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload
	systemctl try-reload-or-restart dbus.service >/dev/null 2>&1 || true
elif [ -S /run/dbus/system_bus_socket ]; then
	busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
		ReloadConfig >/dev/null 2>&1 || true
fi
say "installed: passtd $("$VENV/bin/passtd" --version | cut -d' ' -f2); try: passtd --help"

if [ "$DEMO" = 1 ]; then
	say "running the demo: passtd demo"
	exec /usr/local/bin/passtd demo
fi
