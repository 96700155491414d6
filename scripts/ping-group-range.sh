#!/bin/bash
# ping-group-range.sh GID: let group GID open unprivileged ping sockets, without ever
# overriding an admin's choice. (setup.sh runs it for the instances' group, nogroup.)
#
# Guest pings go through ping sockets (SOCK_DGRAM/IPPROTO_ICMP), which the kernel allows
# to the groups within net.ipv4.ping_group_range. Debian leaves it at the kernel's closed
# default, "1 0". Then, and only then, this opens it for GID alone, persistently
# (/etc/sysctl.d/60-passtd-ping.conf) and now. A range an admin has set (anything but
# "1 0") is kept as it is: if it does not cover GID, guest pings get no answer, and this
# says what to change. Exit status 0 in every case: pings are not worth failing setup for.
#
# For tests: PING_RANGE_FILE (default /proc/sys/net/ipv4/ping_group_range), PING_CONF
# (default /etc/sysctl.d/60-passtd-ping.conf), SYSCTL (default sysctl).
set -euo pipefail
gid=$1
range_file=${PING_RANGE_FILE:-/proc/sys/net/ipv4/ping_group_range}
conf=${PING_CONF:-/etc/sysctl.d/60-passtd-ping.conf}
sysctl=${SYSCTL:-sysctl}

read -r lo hi <"$range_file"
if [ "$lo" -le "$gid" ] && [ "$gid" -le "$hi" ]; then
	exit 0  # already allowed
fi
if [ -e "$conf" ]; then
	"$sysctl" -q -p "$conf" || true  # an earlier run's file (or an admin's): as it says
	exit 0
fi
if [ "$lo" = 1 ] && [ "$hi" = 0 ]; then
	echo "net.ipv4.ping_group_range = $gid $gid" >"$conf"
	"$sysctl" -q -p "$conf" || true
	echo "setup: opened net.ipv4.ping_group_range to group $gid (guest pings), in $conf"
	exit 0
fi
echo "setup: net.ipv4.ping_group_range is \"$lo $hi\", set by this machine's admin: left" \
	"as it is. Guest pings need group $gid in it; to allow them, widen the range to cover" \
	"$gid in your sysctl configuration (e.g. /etc/sysctl.d/), or ignore this if guests" \
	"need not ping." >&2
