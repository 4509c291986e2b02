#!/usr/bin/env bash
# Install the Debian packages given as arguments, only those not installed.
#
#   bin/deps-debian.sh openssl curl haproxy ...
#
# - asks dpkg first; runs `apt-get update` once, and only if something is
#   missing;
# - installs non-interactively, with a policy-rc.d that forbids starting
#   services (exit 101) unless one is already in place, so haproxy, nginx,
#   postfix, slapd ... do not grab ports;
# - afterwards, stops any haproxy/nginx/postfix/slapd daemon the install left
#   running, by the PID in its pid file (never by name).
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 PACKAGE..." >&2
    exit 2
fi

missing=()
for pkg in "$@"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "deps-debian: all present: $*"
    exit 0
fi

echo "deps-debian: installing: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# written by dcrouter bin/deps-debian.sh while installing\nexit 101\n' \
        | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
fi
cleanup() {
    if [ "$own_policy" -eq 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}"

# Daemons that an install could have started despite the policy (e.g. a
# package that starts its daemon directly from postinst). Stop them by PID.
for pidfile in /run/nginx.pid /run/haproxy.pid /run/slapd/slapd.pid \
               /var/spool/postfix/pid/master.pid /run/pebble.pid; do
    [ -r "$pidfile" ] || continue
    pid=$(tr -dc '0-9' < "$pidfile")
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
        echo "deps-debian: stopping daemon left running: pid $pid ($pidfile)"
        $SUDO kill -TERM "$pid" || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
done

for pkg in "${missing[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [ "$status" != "installed" ]; then
        echo "deps-debian: $pkg is still not installed" >&2
        exit 1
    fi
done
echo "deps-debian: done"
