#!/usr/bin/env bash
# The packaged unit under a real systemd, on Debian bookworm, as root:
#
#   bin/test-systemd.sh path/to/dcrouter_VERSION_all.deb [OUTDIR]
#
# (bin/test-package.sh runs it on the .deb it built when DCROUTER_PKG_SYSTEMD=1.)
#
#  1. a minimal bookworm with systemd, debootstrapped from the mirror apt
#     uses (40 to 80 s, 250 MB; removed at the end);
#  2. apt installs the .deb there from nothing (its Depends resolved by apt);
#     the host's pebble (Debian's package) and a CA for its API are copied in;
#  3. systemd-nspawn boots it on a private network (only its own loopback:
#     the ports dcrouter binds there are the container's);
#  4. tests/package/systemd-check.sh drives the unit as shipped inside it:
#     start at boot, reload (under traffic too), the hardening against what
#     dcrouter does (ACME, DNS, mail queue, workers, certificates, splice),
#     restart, stop while a connection drains, then the maintainer scripts
#     under a running systemd (upgrade, remove, purge);
#  5. `systemctl poweroff` in the container, then its nspawn is waited for
#     (SIGTERM, then SIGKILL by PID if it hangs).
#
# Logs go to OUTDIR (default: a new /tmp directory): debootstrap.log,
# nspawn-install.log, nspawn-boot.log, nspawn-check.log and
# dcrouter-journal.log (journalctl -u dcrouter). DCROUTER_PKG_KEEP=1 keeps
# the container's root. About 2.5 to 4 min in all on 2 cores.
# DCROUTER_SYSTEMD_BASE=DIR starts from a copy of DIR, a root made by the
# same debootstrap command, instead (repeated runs: 40 s less each).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8

if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then
    echo "usage: $0 DEB [OUTDIR]" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "test-systemd: run as root (debootstrap, systemd-nspawn)" >&2
    exit 2
fi
DEB=$(realpath "$1")
[ -f "$DEB" ] || { echo "test-systemd: no $DEB" >&2; exit 2; }
OUT=${2:-$(mktemp -d /tmp/dcrouter-systemd-out.XXXXXX)}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
WORK=$(mktemp -d /tmp/dcrouter-systemd-work.XXXXXX)
ROOT=$WORK/root

T0=$SECONDS
NSPAWN=
fail() {
    echo "test-systemd: FAILED: $*" >&2
    exit 1
}
stop_nspawn() {  # poweroff inside, then TERM/KILL the nspawn by PID
    local i
    [ -n "$NSPAWN" ] && kill -0 "$NSPAWN" 2>/dev/null || return 0
    if [ -n "${INIT:-}" ]; then
        nsenter -t "$INIT" -a systemctl poweroff >/dev/null 2>&1 || true
        for ((i = 0; i < 300; i++)); do
            kill -0 "$NSPAWN" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if kill -0 "$NSPAWN" 2>/dev/null; then
        echo "test-systemd: the container did not power off in 30 s: SIGTERM to nspawn $NSPAWN" >&2
        kill -TERM "$NSPAWN" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            kill -0 "$NSPAWN" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$NSPAWN" 2>/dev/null || true
    fi
    wait "$NSPAWN" 2>/dev/null || true
    NSPAWN=
}
cleanup() {
    local status=$?
    stop_nspawn
    if [ "${DCROUTER_PKG_KEEP:-0}" = 1 ]; then
        echo "test-systemd: kept $ROOT"
    else
        rm -rf "$WORK"
    fi
    echo "test-systemd: $((SECONDS - T0))s; logs in $OUT"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$REPO/bin/deps-debian.sh" debootstrap systemd-container openssl pebble

# -- 1. a minimal bookworm ----------------------------------------------------------
mirror=$(sed -n 's|^URIs:[[:space:]]*\([^[:space:]]*/debian\)[[:space:]]*$|\1|p' \
    /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}
t=$SECONDS
if [ -n "${DCROUTER_SYSTEMD_BASE:-}" ]; then
    cp -a "$DCROUTER_SYSTEMD_BASE" "$ROOT"
    echo "test-systemd: a copy of $DCROUTER_SYSTEMD_BASE: $((SECONDS - t))s"
else
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl,ca-certificates \
        bookworm "$ROOT" "$mirror" > "$OUT/debootstrap.log" 2>&1 \
        || { tail -20 "$OUT/debootstrap.log" >&2; fail "debootstrap bookworm $mirror"; }
    echo "test-systemd: debootstrap bookworm from $mirror: $((SECONDS - t))s"
fi

# -- 2. the package, pebble, a CA for pebble's API ----------------------------------
mkdir -p "$ROOT/srv/pkg" "$ROOT/srv/pebble"
cp "$DEB" "$ROOT/srv/pkg/"
install -m 0755 "$REPO/tests/package/systemd-check.sh" "$ROOT/srv/systemd-check.sh"
install -m 0755 /usr/bin/pebble "$ROOT/usr/local/bin/pebble"
(
    cd "$ROOT/srv/pebble"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=dcrouter-test-pebble-ca -keyout ca.key -out ca.pem
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
        -keyout key.pem -out req.csr
    openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile <(printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' \
            'basicConstraints=CA:FALSE' 'extendedKeyUsage=serverAuth') -out cert.pem
    rm -f ca.key req.csr ca.srl
) > "$OUT/pebble-ca.log" 2>&1 || { cat "$OUT/pebble-ca.log" >&2; fail "the CA for pebble's API"; }
t=$SECONDS
systemd-nspawn -q -D "$ROOT" --register=no --keep-unit -E DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "/srv/pkg/$(basename "$DEB")" \
    > "$OUT/nspawn-install.log" 2>&1 </dev/null \
    || { tail -30 "$OUT/nspawn-install.log" >&2; fail "apt-get install in a minimal bookworm"; }
echo "test-systemd: apt-get install ./$(basename "$DEB") in it: $((SECONDS - t))s," \
    "$(grep -c '^Setting up ' "$OUT/nspawn-install.log") package(s) set up"

# -- 3. boot ------------------------------------------------------------------------
t=$SECONDS
systemd-nspawn -b -q -D "$ROOT" --register=no --keep-unit --private-network --console=pipe \
    > "$OUT/nspawn-boot.log" 2>&1 </dev/null &
NSPAWN=$!
INIT=
state=
for _ in $(seq 300); do
    kill -0 "$NSPAWN" 2>/dev/null || { cat "$OUT/nspawn-boot.log" >&2; fail "systemd-nspawn exited"; }
    INIT=$(pgrep -P "$NSPAWN" | head -1 || true)
    if [ -n "$INIT" ]; then
        state=$(nsenter -t "$INIT" -a systemctl is-system-running 2>/dev/null || true)
        case "$state" in running|degraded) break ;; esac
    fi
    sleep 0.1
done
case "$state" in
    running|degraded) echo "test-systemd: booted in $((SECONDS - t))s: nspawn pid $NSPAWN, init pid $INIT, system $state" ;;
    *) fail "the container did not finish booting in 30 s (state: '$state')" ;;
esac
if [ "$state" = degraded ]; then
    nsenter -t "$INIT" -a systemctl --failed --no-pager --no-legend || true
fi

# -- 4. the checks ------------------------------------------------------------------
t=$SECONDS
check_status=0
nsenter -t "$INIT" -a /srv/systemd-check.sh > "$OUT/nspawn-check.log" 2>&1 || check_status=$?
cat "$OUT/nspawn-check.log"
nsenter -t "$INIT" -a journalctl -u dcrouter --no-pager -o short-precise > "$OUT/dcrouter-journal.log" 2>&1 || true
echo "test-systemd: checks: $((SECONDS - t))s"

# -- 5. power off ---------------------------------------------------------------------
stop_nspawn
[ "$check_status" -eq 0 ] || fail "the unit under systemd (log: $OUT/nspawn-check.log)"
echo "test-systemd: PASSED"
