#!/bin/sh
# The unit as shipped, under a real systemd: run inside a minimal bookworm
# booted with systemd-nspawn, with the package installed by apt
# (bin/test-package.sh, DCROUTER_PKG_SYSTEMD=1). Ports 80, 443 and 8443 are
# the container's own (--private-network).
set -eu

fail() {
    echo "in the container: FAILED: $*" >&2
    journalctl -u dcrouter --no-pager | tail -30 >&2
    exit 1
}

body=$(sed -n 's/^body = //p' /etc/dcrouter.ini)
systemctl is-active --quiet dcrouter || fail "dcrouter.service is not active after boot"
# Type=simple: "started" means exec'd, not listening yet; wait up to 15 s.
ok=
for _ in $(seq 150); do
    if [ "$(curl -sS --max-time 2 http://127.0.0.1/ 2>/dev/null)" = "$body" ]; then
        ok=1
        break
    fi
    sleep 0.1
done
[ -n "$ok" ] || fail "no static answer on port 80"
echo "ok: enabled by the package, started at boot, answers on port 80"

pid=$(systemctl show -p MainPID --value dcrouter)
[ "$(ps -o user= -p "$pid")" = dcrouter ] || fail "main process not run as dcrouter"
grep -q '^CapEff:[[:space:]]*0000000000000400$' "/proc/$pid/status" \
    || fail "capabilities: $(grep Cap "/proc/$pid/status")"
grep -q '^NoNewPrivs:[[:space:]]*1$' "/proc/$pid/status" || fail "no_new_privs unset"
grep -q '^Seccomp:[[:space:]]*2$' "/proc/$pid/status" || fail "no seccomp filter"
echo "ok: pid $pid, user dcrouter, CAP_NET_BIND_SERVICE only, no_new_privs, seccomp filter"

# TLS termination (self-signed certificate made in /var/lib/dcrouter), an
# active health check, HTTP/2, and re-encryption verified against that
# certificate: pyOpenSSL callbacks and service_identity under the sandbox.
cp /etc/dcrouter.ini /root/dcrouter.ini.orig
cat >> /etc/dcrouter.ini <<EOF

[route:tls]
ports = 443
tls = terminate
action = http
target = 127.0.0.1:80
health_check = http
health_interval = 1s
EOF
systemctl reload dcrouter || fail "systemctl reload (TLS route)"
ok=
for _ in $(seq 100); do
    if [ "$(curl -sSk --max-time 5 https://localhost/ 2>/dev/null)" = "$body" ]; then
        ok=1
        break
    fi
    sleep 0.05
done
[ -n "$ok" ] || fail "the TLS route is not up after the reload"
[ "$(curl -sSk --http2 -o /dev/null -w '%{http_version}' https://localhost/)" = 2 ] \
    || fail "no HTTP/2 on the TLS route"
[ "$(stat -c '%U %a' /var/lib/dcrouter/tls/selfsigned.key)" = "dcrouter 600" ] \
    || fail "self-signed key: $(ls -l /var/lib/dcrouter/tls)"
# The self-signed certificate now exists: re-encrypt to the TLS route,
# verifying it.
cat >> /etc/dcrouter.ini <<EOF

[route:reencrypt]
ports = 8443
tls = terminate-and-reencrypt
action = forward
target = 127.0.0.1:443
backend_ca = /var/lib/dcrouter/tls/selfsigned.pem
backend_server_name = localhost
EOF
systemctl reload dcrouter || fail "systemctl reload (re-encrypting route)"
ok=
for _ in $(seq 100); do
    if [ "$(curl -sSk --max-time 5 https://localhost:8443/ 2>/dev/null)" = "$body" ]; then
        ok=1
        break
    fi
    sleep 0.05
done
[ -n "$ok" ] || fail "terminate-and-reencrypt, verified against the state's certificate"
echo "ok: reload; TLS terminated (HTTP/1.1, HTTP/2), re-encrypted and verified; key 0600 in /var/lib/dcrouter"

printf '\n[route:bad]\nports = eighty\n' >> /etc/dcrouter.ini
if systemctl reload dcrouter 2>/dev/null; then
    fail "systemctl reload accepted a bad file"
fi
systemctl is-active --quiet dcrouter || fail "a bad reload stopped the service"
[ "$(curl -sSk --max-time 5 https://localhost/)" = "$body" ] || fail "a bad reload changed what is served"
echo "ok: a bad file fails 'systemctl reload' (ExecReload checkconfig); the service keeps serving"
cp /root/dcrouter.ini.orig /etc/dcrouter.ini

kill -KILL "$pid"
for _ in $(seq 100); do
    new=$(systemctl show -p MainPID --value dcrouter)
    if [ "$new" != 0 ] && [ "$new" != "$pid" ] && curl -sS --max-time 1 http://127.0.0.1/ >/dev/null 2>&1; then
        break
    fi
    sleep 0.1
done
[ "$(systemctl show -p NRestarts --value dcrouter)" = 1 ] || fail "not restarted after SIGKILL"
echo "ok: Restart=on-failure brought it back after SIGKILL"

systemd-analyze security dcrouter --no-pager | tail -1
systemctl stop dcrouter
if systemctl is-active --quiet dcrouter; then
    fail "still active after systemctl stop"
fi
echo "ok: systemctl stop"
