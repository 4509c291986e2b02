#!/usr/bin/env bash
# Build, lint, install and test the Debian package end to end, on Debian
# bookworm, as root (CI, or a developer's machine):
#
#   bin/test-package.sh
#
#  1. installs what it needs with bin/deps-debian.sh (debian/control's
#     Build-Depends, lintian, and the test suite's peers via `make deps-debian`);
#  2. copies the source to a temporary directory (the work tree stays clean)
#     and builds it there: dpkg-buildpackage -us -uc -b;
#  3. lintian (fails on any error; warnings and infos are printed);
#     systemd-analyze verify and security on the unit;
#  4. apt-get install ./dcrouter_*.deb, which pulls Debian's python3 packages;
#     tests/package checks the installed package in place;
#  5. the dpkg triggers: a throw-away plugin package in dcrouter/plugins;
#  6. a smoke test: twistd3 dcrouter as the dcrouter user, with the unit's
#     capabilities, on the shipped /etc/dcrouter.ini moved to test ports,
#     traffic through it with curl, SIGHUP reload, SIGTERM by PID;
#  7. the whole test suite with /usr/bin/python3 and Debian's packages
#     (Twisted 22.4, pytest, pytest-twisted, ...), against the installed
#     dcrouter (the tests are copied without the source tree);
#  8. reinstall (upgrade path, local conffile edits kept), then purge;
#  9. with DCROUTER_PKG_SYSTEMD=1, the unit under a real systemd:
#     bin/test-systemd.sh (a minimal bookworm from debootstrap where apt
#     installs the .deb from nothing, booted with systemd-nspawn; start,
#     reload under traffic, ACME, DNS, mail, restart, stop, upgrade, purge;
#     2.5 to 4 min, a third of it debootstrap).
#
# Everything it starts is stopped by PID. Output (the .deb, .changes,
# build and test logs) goes to $DCROUTER_PKG_OUT, else a new /tmp directory,
# printed at the end; the scratch directory is removed unless
# DCROUTER_PKG_KEEP=1, which also leaves the package installed.
#
# DCROUTER_PKG_SOURCE=head builds `git archive HEAD` plus the work tree's
# debian/, bin/test-package.sh, bin/test-systemd.sh and tests/package/ (to
# test the packaging while unrelated work is uncommitted); default: the work
# tree's tracked and untracked, not ignored, files.
# PYTEST_ARGS adds arguments to the suite's pytest (e.g. "-x", "-k lifecycle").
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Debian's tools and Debian's python3 only (no pyenv, no venv, no /usr/local).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
SUITE_TIME_LIMIT=${SUITE_TIME_LIMIT:-20m}

if [ "$(id -u)" -ne 0 ]; then
    echo "test-package: run as root (it installs and purges the package)" >&2
    exit 2
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "test-package: warning: this is ${PRETTY_NAME:-an unknown system}, not Debian bookworm" >&2
fi

OUT=${DCROUTER_PKG_OUT:-$(mktemp -d /tmp/dcrouter-pkg-out.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/dcrouter-pkg-work.XXXXXX)
chmod 0755 "$WORK"    # the dcrouter user reads its smoke configuration here

T0=$SECONDS
STEP_NAME=
STEP_START=$SECONDS
TIMINGS=()
step() {
    step_end
    STEP_NAME=$1
    STEP_START=$SECONDS
    echo
    echo "=== test-package: $1  (t=$((SECONDS - T0))s)"
}
step_end() {
    if [ -n "$STEP_NAME" ]; then
        TIMINGS+=("$(printf '%5ss  %s' $((SECONDS - STEP_START)) "$STEP_NAME")")
    fi
    STEP_NAME=
}
fail() {
    echo "test-package: FAILED: $*" >&2
    exit 1
}

# -- processes we start: stopped by PID, always ---------------------------------
PIDS=()
stop_pid() {  # stop_pid PID [SECONDS]: TERM, wait, then KILL
    local pid=$1 wait=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "test-package: pid $pid ignored SIGTERM for ${wait}s: SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local status=$?
    step_end
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid" 5
    done
    if dpkg-query -W -f='${db:Status-Status}' dcrouter-test-plugin 2>/dev/null | grep -q installed; then
        dpkg --purge dcrouter-test-plugin >/dev/null 2>&1 || true
    fi
    if [ "${DCROUTER_PKG_KEEP:-0}" = 1 ]; then
        echo "test-package: kept $WORK"
    else
        rm -rf "$WORK"
    fi
    echo
    echo "=== test-package: timings"
    printf '%s\n' "${TIMINGS[@]}"
    printf '%5ss  total\n' $((SECONDS - T0))
    echo "=== test-package: output in $OUT"
    if [ "$status" -eq 0 ]; then
        echo "=== test-package: PASSED"
    else
        echo "=== test-package: FAILED (exit $status)"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for FILE REGEX SECONDS [PID]: poll a log for a line
    local file=$1 regex=$2 limit=$3 pid=${4:-} i
    for ((i = 0; i < limit * 20; i++)); do
        grep -Eq -- "$regex" "$file" 2>/dev/null && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            grep -Eq -- "$regex" "$file" 2>/dev/null && return 0
            echo "--- $file:" >&2; cat "$file" >&2
            fail "process $pid exited before /$regex/ appeared in $file"
        fi
        sleep 0.05
    done
    echo "--- $file:" >&2; cat "$file" >&2
    fail "timed out after ${limit}s waiting for /$regex/ in $file"
}

expect_body() {  # expect_body WHAT EXPECTED CURL-ARGS...
    local what=$1 expected=$2 got
    shift 2
    got=$(curl -sS --max-time 10 "$@") || fail "$what: curl $* failed"
    if [ "$got" != "$expected" ]; then
        fail "$what: expected '$expected', got '$got'"
    fi
    echo "ok: $what"
}

free_ports() {  # free_ports N: N distinct free TCP ports on 127.0.0.1
    /usr/bin/python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

free_privileged_port() {  # a free port below 1024 on 127.0.0.1 (we are root)
    /usr/bin/python3 - <<'EOF'
import socket
for port in range(1023, 899, -1):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
EOF
}

# -- 1. dependencies -------------------------------------------------------------
step "dependencies (bin/deps-debian.sh)"
build_deps=$(sed -n '/^Build-Depends:/,/^[A-Z][A-Za-z-]*:/p' "$REPO/debian/control" \
    | sed -e '1s/^Build-Depends://' -e '$d' | tr ',' '\n' \
    | sed -e 's/[[(<].*//' -e 's/[[:space:]]//g' | grep -v '^$' | grep -v '^debhelper-compat$')
# shellcheck disable=SC2086
"$REPO/bin/deps-debian.sh" debhelper dpkg-dev lintian systemd util-linux curl openssl \
    python3-websockets $build_deps
# The suite's real peers (haproxy, nginx, slapd, ...): the Makefile's list.
make --no-print-directory -C "$REPO" deps-debian

# -- 2. build out of tree --------------------------------------------------------
step "copy the source"
SRC=$WORK/build/dcrouter
mkdir -p "$SRC"
if [ "${DCROUTER_PKG_SOURCE:-tree}" = head ]; then
    git -C "$REPO" archive HEAD | tar -x -C "$SRC"
    rm -rf "$SRC/debian" "$SRC/tests/package"
    (cd "$REPO" && tar -c debian bin/test-package.sh bin/test-systemd.sh tests/package) | tar -x -C "$SRC"
    echo "source: git HEAD $(git -C "$REPO" rev-parse --short HEAD) + the work tree's packaging"
elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar --null -T - -c) | tar -x -C "$SRC"
    echo "source: work tree at $(git -C "$REPO" rev-parse --short HEAD)" \
         "($(git -C "$REPO" status --porcelain | wc -l) changed or new path(s))"
else
    tar -C "$REPO" -c --exclude=.git --exclude=.venv --exclude=__pycache__ \
        --exclude=dropin.cache --exclude=.hypothesis --exclude=state . | tar -x -C "$SRC"
    echo "source: $REPO (not a git work tree)"
fi

# The suite runs from a copy without the code (dcrouter/, twisted/plugins/):
# what it imports and what its twistd runs is the installed package.
SUITE=$WORK/suite/dcrouter
mkdir -p "$SUITE"
tar -C "$SRC" -c --exclude=./dcrouter --exclude=./twisted --exclude=./debian \
    --exclude=./setup.py --exclude='*.egg-info' . | tar -x -C "$SUITE"
# The shared probes (http_probe, tls_probe) are found at ../shared.
if [ -d "$REPO/../shared" ]; then
    ln -s "$(cd "$REPO/../shared" && pwd)" "$WORK/suite/shared"
fi

version=$(dpkg-parsechangelog -l "$SRC/debian/changelog" -S Version)
upstream=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$SRC/dcrouter/__init__.py")
if [ "${version%-*}" != "$upstream" ]; then
    fail "debian/changelog is at $version but dcrouter.__version__ is $upstream:" \
         "add an entry (dch -v $upstream-1) before releasing"
fi
echo "version: $version"

step "dpkg-buildpackage -us -uc -b"
if ! (cd "$SRC" && dpkg-buildpackage -us -uc -b) > "$OUT/build.log" 2>&1; then
    tail -60 "$OUT/build.log" >&2
    fail "dpkg-buildpackage (log: $OUT/build.log)"
fi
grep -E '^[0-9]+ passed|passed in|dpkg-deb: building' "$OUT/build.log" || true
cp "$WORK"/build/dcrouter_"$version"_* "$OUT"/
DEB=$OUT/dcrouter_${version}_all.deb
CHANGES=$(ls "$OUT"/dcrouter_"$version"_*.changes)
[ -f "$DEB" ] || fail "no $DEB"
dpkg-deb -I "$DEB" | sed -n '/Depends:/p'
dpkg-deb -c "$DEB" > "$OUT/contents.txt"
if grep -Eq 'dropin\.cache|__pycache__|\.pyc$' "$OUT/contents.txt"; then
    fail "the .deb ships generated files: $(grep -E 'dropin|pycache|pyc$' "$OUT/contents.txt")"
fi
# setup.py lists the packages by hand: every module of the source is shipped.
missing=$(cd "$SRC" && find dcrouter twisted/plugins -name '*.py' -not -path '*/__pycache__/*' | sort \
    | while read -r f; do
        grep -q " \./usr/lib/python3/dist-packages/$f\$" "$OUT/contents.txt" || echo "$f"
    done)
[ -z "$missing" ] || fail "modules not in the .deb (setup.py's package list?): $missing"
echo "all $(cd "$SRC" && find dcrouter twisted/plugins -name '*.py' -not -path '*/__pycache__/*' | wc -l) modules of dcrouter/ and twisted/plugins/ are in the .deb"

# -- 3. lintian, systemd-analyze -------------------------------------------------
step "lintian"
lintian_status=0
lintian -I --pedantic --fail-on error "$CHANGES" > "$OUT/lintian.txt" 2>&1 || lintian_status=$?
grep -v '^running with root privileges' "$OUT/lintian.txt" || true
[ "$lintian_status" -eq 0 ] || fail "lintian reports errors (exit $lintian_status)"
echo "lintian: no error ($(grep -c '^W:' "$OUT/lintian.txt" || true) warning(s), $(grep -c '^[IP]:' "$OUT/lintian.txt" || true) info/pedantic)"

# -- 4. install ------------------------------------------------------------------
# A first install (what postinst does then: the user, the state directory,
# the configuration's mode), even where an earlier run that failed left the
# package installed.
if dpkg-query -W -f='${db:Status-Status}' dcrouter 2>/dev/null | grep -qv '^not-installed$'; then
    dpkg --purge dcrouter > "$OUT/purge-before.log" 2>&1 || fail "dpkg --purge dcrouter (left by an earlier run)"
fi
step "apt-get install ./$(basename "$DEB")"
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$DEB" > "$OUT/install.log" 2>&1; then
    cat "$OUT/install.log" >&2
    fail "apt-get install ./$(basename "$DEB")"
fi
grep -E '^(Setting up|Unpacking) |dcrouter' "$OUT/install.log" | grep -v '^Selecting' || true
[ "$(dpkg-query -W -f='${Version} ${db:Status-Status}' dcrouter)" = "$version installed" ] \
    || fail "dcrouter $version is not installed"

step "systemd-analyze verify / security (offline)"
# (Without man-db, the man: link in Documentation= cannot be checked.)
systemd-analyze verify /lib/systemd/system/dcrouter.service 2>&1 \
    | grep -v "Command 'man dcrouter(1)' failed" | tee "$OUT/systemd-verify.txt" || true
if grep -q 'dcrouter' "$OUT/systemd-verify.txt"; then
    fail "systemd-analyze verify complains about the unit"
fi
systemd-analyze security --offline=yes --threshold=25 /lib/systemd/system/dcrouter.service \
    > "$OUT/systemd-security.txt" 2>&1 || { cat "$OUT/systemd-security.txt" >&2; fail "unit exposure above 2.5"; }
grep -E '✗|Overall' "$OUT/systemd-security.txt" || true


step "tests/package on the installed package"
(cd "$SUITE" && DCROUTER_TEST_INSTALLED=1 /usr/bin/python3 -m pytest -p no:cacheprovider \
    -q -rs tests/package) 2>&1 | tee "$OUT/pytest-package.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "tests/package"

# -- 5. triggers -----------------------------------------------------------------
step "dpkg triggers: a plugin package comes and goes"
PLUG=$WORK/plugin-deb
PLUGDIR=$PLUG/usr/lib/python3/dist-packages/dcrouter/plugins
mkdir -p "$PLUG/DEBIAN" "$PLUGDIR"
cp "$SRC/tests/system/plugin_fixture/dcrouter/plugins/echo_action.py" "$PLUGDIR/dcrouter_test_echo.py"
cat > "$PLUG/DEBIAN/control" <<EOF
Package: dcrouter-test-plugin
Version: 1.0
Architecture: all
Maintainer: dcrouter developers <dev@dcrouter.invalid>
Depends: dcrouter
Description: throw-away dcrouter plugin (bin/test-package.sh)
 The echo route action of tests/system/plugin_fixture.
EOF
printf '#!/bin/sh\nrm -f /usr/lib/python3/dist-packages/dcrouter/plugins/__pycache__/dcrouter_test_echo.*\n' \
    > "$PLUG/DEBIAN/prerm"
chmod 0755 "$PLUG/DEBIAN/prerm"
dpkg-deb --root-owner-group -b "$PLUG" "$WORK/dcrouter-test-plugin.deb" >/dev/null
cache_has() {  # cache_has DIR MODULE: is MODULE in DIR/dropin.cache?
    /usr/bin/python3 -c 'import pickle, sys
print(sys.argv[2] in pickle.load(open(sys.argv[1] + "/dropin.cache", "rb")))' "$1" "$2"
}
DPLUG=/usr/lib/python3/dist-packages/dcrouter/plugins
TPLUG=/usr/lib/python3/dist-packages/twisted/plugins
dpkg -i "$WORK/dcrouter-test-plugin.deb" 2>&1 | tee "$OUT/trigger.log"
grep -q 'Processing triggers for dcrouter' "$OUT/trigger.log" || fail "installing a plugin did not trigger dcrouter"
[ "$(cache_has $DPLUG dcrouter_test_echo)" = True ] || fail "the trigger did not add the plugin to $DPLUG/dropin.cache"
printf '[route:echo]\nports = 1\naction = echo\n' > "$WORK/echo.ini"
chmod 0644 "$WORK/echo.ini"
setpriv --reuid=dcrouter --regid=dcrouter --init-groups dcrouter checkconfig "$WORK/echo.ini" \
    || fail "action = echo is unknown after the plugin package was installed"
dpkg --purge dcrouter-test-plugin 2>&1 | tee -a "$OUT/trigger.log"
[ "$(cache_has $DPLUG dcrouter_test_echo)" = False ] || fail "the trigger did not drop the removed plugin from the cache"
[ "$(cache_has $TPLUG dcrouter_plugin)" = True ] || fail "twistd's plugin cache lost dcrouter"
echo "ok: the plugin package activated the trigger; caches follow it"

# -- 6. smoke test ---------------------------------------------------------------
step "smoke test: twistd3 dcrouter as the dcrouter user"
SMOKE=$WORK/smoke
mkdir -p "$SMOKE/state"
chown dcrouter:dcrouter "$SMOKE/state"
chmod 0700 "$SMOKE/state"
read -r P_STATIC P_PROXY P_TLS <<<"$(free_ports 3)"
P_PRIV=$(free_privileged_port)
[ -n "$P_PRIV" ] || fail "no free port below 1024 on 127.0.0.1"
SHIPPED_BODY=$(sed -n 's/^body = //p' /etc/dcrouter.ini)
# The shipped file, moved to test ports and a test state directory, plus
# routes that send traffic through the proxy and TLS paths.
sed -e "s|^state_dir = .*|state_dir = $SMOKE/state|" \
    -e "s|^drain_timeout = .*|drain_timeout = 2s|" \
    -e "s|^bind = .*|bind = 127.0.0.1|" \
    -e "s|^ports = 80$|ports = $P_STATIC, $P_PRIV|" /etc/dcrouter.ini > "$SMOKE/base.ini"
grep -q "^ports = $P_STATIC, $P_PRIV\$" "$SMOKE/base.ini" || fail "the shipped config has no 'ports = 80' to move"
cat > "$SMOKE/routes.ini" <<EOF

[route:smoke-proxy]
ports = $P_PROXY
action = http
target = 127.0.0.1:$P_STATIC

[route:smoke-tls]
ports = $P_TLS
tls = terminate
action = http
target = 127.0.0.1:$P_STATIC
EOF
cat "$SMOKE/base.ini" "$SMOKE/routes.ini" > "$SMOKE/dcrouter.ini"
chmod 0644 "$SMOKE"/*.ini
setpriv --reuid=dcrouter --regid=dcrouter --init-groups dcrouter checkconfig "$SMOKE/dcrouter.ini" \
    || fail "checkconfig (the unit's ExecStartPre) refuses the smoke configuration"
# As the unit runs it: user dcrouter, no_new_privs, CAP_NET_BIND_SERVICE as
# the only (ambient) capability. setpriv execs twistd3 (runuser would fork,
# and SIGKILL the daemon 2 s after passing on a SIGTERM): $! is the daemon.
(cd "$SMOKE" && exec setpriv --reuid=dcrouter --regid=dcrouter --init-groups --no-new-privs \
    --bounding-set=-all,+net_bind_service --inh-caps=-all,+net_bind_service \
    --ambient-caps=-all,+net_bind_service \
    env PYTHONUNBUFFERED=1 /usr/bin/twistd3 --nodaemon --pidfile= dcrouter \
    --config "$SMOKE/dcrouter.ini") > "$OUT/smoke.log" 2>&1 </dev/null &
DAEMON=$!
PIDS+=("$DAEMON")
wait_for "$OUT/smoke.log" 'dcrouter listening on' 20 "$DAEMON"
echo "twistd3 dcrouter: pid $DAEMON, user $(ps -o user= -p "$DAEMON"), $(grep CapEff "/proc/$DAEMON/status" | tr -s '\t ' ' ')"
[ "$(ps -o user= -p "$DAEMON")" = dcrouter ] || fail "the daemon does not run as dcrouter"
expect_body "static answer on :$P_STATIC" "$SHIPPED_BODY" "http://127.0.0.1:$P_STATIC/"
expect_body "static answer on privileged :$P_PRIV (CAP_NET_BIND_SERVICE)" "$SHIPPED_BODY" "http://127.0.0.1:$P_PRIV/"
expect_body "reverse proxy :$P_PROXY -> :$P_STATIC" "$SHIPPED_BODY" "http://127.0.0.1:$P_PROXY/some/path?q=1"
expect_body "TLS terminated on :$P_TLS -> :$P_STATIC" "$SHIPPED_BODY" -k --resolve "router.test:$P_TLS:127.0.0.1" "https://router.test:$P_TLS/"
code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 -X POST --data x "http://127.0.0.1:$P_PROXY/") \
    || fail "POST through the proxy"
[ "$code" = 200 ] || fail "POST through the proxy: HTTP $code"
wait_for "$OUT/smoke.log" "route=smoke-proxy target=127\.0\.0\.1:$P_STATIC" 5
wait_for "$OUT/smoke.log" "route=smoke-tls target=127\.0\.0\.1:$P_STATIC" 5
echo "ok: access records for the proxied and TLS requests"
# The self-signed certificate went into the state directory, as dcrouter.
found=$(find "$SMOKE/state" -type f ! -user dcrouter)
[ -z "$found" ] || fail "files in the state directory not owned by dcrouter: $found"
[ -n "$(find "$SMOKE/state" -type f -name '*.key' -perm 0600)" ] \
    || fail "no private key (0600) in the state directory: $(ls -lR "$SMOKE/state")"
echo "ok: self-signed certificate in the state directory: $(cd "$SMOKE/state" && find . -type f | tr '\n' ' ')"
# The admin socket: root and the dcrouter user may ask the daemon; nobody else.
[ "$(stat -c '%U %a %F' "$SMOKE/state/admin.sock")" = "dcrouter 600 socket" ] \
    || fail "the admin socket: $(ls -l "$SMOKE/state/admin.sock" 2>&1)"
dcrouter certs "$SMOKE/dcrouter.ini" | grep -qx "no certificate = auto routes" \
    || fail "dcrouter certs as root"
setpriv --reuid=dcrouter --regid=dcrouter --init-groups dcrouter queue "$SMOKE/dcrouter.ini" \
    | grep -qx "the queue is empty" || fail "dcrouter queue as the dcrouter user"
if setpriv --reuid=nobody --regid=nogroup --clear-groups dcrouter queue "$SMOKE/dcrouter.ini" \
    2> "$OUT/nobody.err"; then
    fail "dcrouter queue as nobody reached the daemon"
fi
grep -q "permission denied" "$OUT/nobody.err" || fail "dcrouter queue as nobody: $(cat "$OUT/nobody.err")"
echo "ok: dcrouter certs|queue over the admin socket as root and dcrouter, refused to nobody"

# Reload (the unit's ExecReload): a new body is served, then a bad file is
# refused and the running configuration stays.
sed "s|^body = .*|body = reloaded|" "$SMOKE/base.ini" | cat - "$SMOKE/routes.ini" > "$SMOKE/new.ini"
mv "$SMOKE/new.ini" "$SMOKE/dcrouter.ini"; chmod 0644 "$SMOKE/dcrouter.ini"
kill -HUP "$DAEMON"
for _ in $(seq 100); do
    [ "$(curl -sS --max-time 5 "http://127.0.0.1:$P_STATIC/" || true)" = reloaded ] && break
    sleep 0.05
done
expect_body "after SIGHUP, the new body" reloaded "http://127.0.0.1:$P_PROXY/"
printf '\n[route:broken]\nports = eighty\n' >> "$SMOKE/dcrouter.ini"
mark=$(wc -l < "$OUT/smoke.log")
kill -HUP "$DAEMON"
for _ in $(seq 100); do
    [ "$(tail -n +"$((mark + 1))" "$OUT/smoke.log" | grep -c "eighty")" -gt 0 ] && break
    sleep 0.05
done
tail -n +"$((mark + 1))" "$OUT/smoke.log" | grep -q "eighty" || fail "a bad reload was not logged"
expect_body "after a bad SIGHUP, still the running configuration" reloaded "http://127.0.0.1:$P_STATIC/"

# Stop by PID: SIGTERM drains (drain_timeout 2s here), then twistd exits.
stopped_at=$SECONDS
kill -TERM "$DAEMON"
for _ in $(seq 200); do
    kill -0 "$DAEMON" 2>/dev/null || break
    sleep 0.05
done
kill -0 "$DAEMON" 2>/dev/null && fail "twistd3 still runs 10 s after SIGTERM"
wait "$DAEMON" 2>/dev/null || true
echo "ok: stopped by SIGTERM in $((SECONDS - stopped_at))s"
if grep -Eq 'Traceback|Unable to write to plugin cache|Unhandled' "$OUT/smoke.log"; then
    grep -E -B2 -A20 'Traceback|Unable to write|Unhandled' "$OUT/smoke.log" >&2
    fail "errors in the daemon's log ($OUT/smoke.log)"
fi

# -- 7. the suite on Debian's python3 ----------------------------------------------
step "pytest with /usr/bin/python3 on Debian's packages"
/usr/bin/python3 - <<'EOF'
import importlib.metadata as m
for name in ("Twisted", "pyOpenSSL", "cryptography", "service-identity", "attrs",
             "pytest", "pytest-twisted", "pytest-timeout", "hypothesis", "websockets"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name} (not installed)")
EOF
suite_status=0
# shellcheck disable=SC2086
(cd "$SUITE" && timeout --kill-after=30s "$SUITE_TIME_LIMIT" /usr/bin/python3 -m pytest \
    -p no:cacheprovider -rfEs --ignore=tests/package ${PYTEST_ARGS:-}) \
    > "$OUT/pytest-system-python.log" 2>&1 || suite_status=$?
grep -E '^(FAILED|ERROR|SKIPPED) ' "$OUT/pytest-system-python.log" || true
tail -1 "$OUT/pytest-system-python.log"
[ "$suite_status" -eq 0 ] || fail "the suite under /usr/bin/python3 (exit $suite_status; log: $OUT/pytest-system-python.log)"

# -- 8. reinstall, purge ---------------------------------------------------------
step "reinstall (upgrade path) keeps a local conffile edit; purge"
echo "# local edit by bin/test-package.sh" >> /etc/dcrouter.ini
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$DEB" > "$OUT/reinstall.log" 2>&1 \
    || { cat "$OUT/reinstall.log" >&2; fail "reinstalling over itself"; }
grep -q '^# local edit by bin/test-package.sh$' /etc/dcrouter.ini || fail "the reinstall lost a local conffile edit"
[ "$(stat -c '%U %a' /var/lib/dcrouter)" = "dcrouter 700" ] || fail "/var/lib/dcrouter after reinstall: $(stat -c '%U %a' /var/lib/dcrouter)"
echo "ok: reinstalled; /etc/dcrouter.ini kept its local edit"
if [ "${DCROUTER_PKG_KEEP:-0}" = 1 ]; then
    sed -i '/^# local edit by bin\/test-package.sh$/d' /etc/dcrouter.ini
    echo "DCROUTER_PKG_KEEP=1: dcrouter stays installed"
else
    apt-get purge -y dcrouter > "$OUT/purge.log" 2>&1 || { cat "$OUT/purge.log" >&2; fail "apt-get purge dcrouter"; }
    left=$(ls -d /etc/dcrouter.ini /var/lib/dcrouter /usr/lib/python3/dist-packages/dcrouter* \
        /usr/lib/python3/dist-packages/twisted/plugins/dcrouter_plugin.py \
        /usr/lib/python3/dist-packages/twisted/plugins/__pycache__/dcrouter_plugin.* 2>/dev/null || true)
    [ -z "$left" ] || fail "left behind by the purge: $left"
    [ "$(cache_has $TPLUG dcrouter_plugin)" = False ] || fail "twistd's plugin cache still lists dcrouter after the purge"
    grep -i 'warning' "$OUT/purge.log" && fail "warnings during the purge" || true
    echo "ok: purged; nothing left; twistd's plugin cache rebuilt without dcrouter; user dcrouter kept: $(id dcrouter)"
fi

# -- 9. under a real systemd (opt-in: DCROUTER_PKG_SYSTEMD=1) -------------------
# bin/test-systemd.sh: a minimal bookworm (debootstrap) where apt installs
# the .deb from nothing, booted with systemd-nspawn on a private network;
# tests/package/systemd-check.sh drives the unit as shipped inside it.
if [ "${DCROUTER_PKG_SYSTEMD:-0}" = 1 ]; then
    step "systemd: a minimal bookworm booted with systemd-nspawn, the unit as shipped"
    "$SRC/bin/test-systemd.sh" "$DEB" "$OUT/systemd" || fail "the unit under systemd (logs: $OUT/systemd)"
fi
step_end
