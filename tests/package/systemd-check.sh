#!/bin/bash
# The unit as shipped, under a real systemd: run inside a minimal bookworm
# booted with systemd-nspawn, with the package installed by apt
# (bin/test-systemd.sh, from bin/test-package.sh with DCROUTER_PKG_SYSTEMD=1).
# Every port it uses (25, 53, 80, 443, 4443, 8080, 8443, 9000, 9001, pebble's
# 14000 and 15000) is the container's own (--private-network). /srv/pebble
# holds pebble's API certificate and the CA that signed it;
# /usr/local/bin/pebble is the host's.
set -euo pipefail

fail() {
    echo "in the container: FAILED: $*" >&2
    journalctl -u dcrouter --no-pager | tail -40 >&2
    exit 1
}
# until SECONDS COMMAND...: run COMMAND every 0.1 s until it succeeds.
until_ok() {
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 10; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}
body_is() {  # body_is EXPECTED CURL-ARGS...
    local expected=$1
    shift
    [ "$(curl -sS --max-time 5 "$@" 2>/dev/null)" = "$expected" ]
}
main_pid() { systemctl show -p MainPID --value dcrouter; }
journal_since() {  # the unit's journal since the cursor in $1
    journalctl -u dcrouter --no-pager -o cat --after-cursor="$1"
}
cursor() { journalctl -u dcrouter -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'; }

body=$(sed -n 's/^body = //p' /etc/dcrouter.ini)
systemctl is-active --quiet dcrouter || fail "dcrouter.service is not active after boot"
# Type=simple: "started" means exec'd, not listening yet.
until_ok 15 body_is "$body" http://127.0.0.1/ || fail "no static answer on port 80"
echo "ok: enabled by the package, started at boot, answers on port 80"

pid=$(main_pid)
[ "$(ps -o user= -p "$pid")" = dcrouter ] || fail "main process not run as dcrouter"
grep -q '^CapEff:[[:space:]]*0000000000000400$' "/proc/$pid/status" \
    || fail "capabilities: $(grep Cap "/proc/$pid/status")"
grep -q '^NoNewPrivs:[[:space:]]*1$' "/proc/$pid/status" || fail "no_new_privs unset"
grep -q '^Seccomp:[[:space:]]*2$' "/proc/$pid/status" || fail "no seccomp filter"
# LimitNOFILE=65536, unless init itself may have fewer (systemd clamps it
# to init's hard limit: a sandbox without CAP_SYS_RESOURCE that gave init
# less).
files=65536
init_files=$(awk '/^Max open files/ {print $5}' /proc/1/limits)
if [ "$init_files" != unlimited ] && [ "$init_files" -lt "$files" ]; then
    echo "note: init may open $init_files files, fewer than LimitNOFILE=$files"
    files=$init_files
fi
grep -Eq "^Max open files +$files +$files " "/proc/$pid/limits" \
    || fail "LimitNOFILE: $(grep 'open files' "/proc/$pid/limits")"
workers=$(pgrep -c -P "$pid" -f 'dcrouter\.workers' || true)
if [ "$(nproc)" -ge 2 ] && [ "$workers" -lt 2 ]; then
    fail "workers = auto on $(nproc) cores started $workers worker(s): $(ps --ppid "$pid" -o pid=,args=)"
fi
for w in $(ps --ppid "$pid" -o pid=); do
    [ "$(ps -o user= -p "$w")" = dcrouter ] || fail "worker $w not run as dcrouter"
    grep -q '^CapEff:[[:space:]]*0000000000000400$' "/proc/$w/status" || fail "worker $w capabilities"
done
echo "ok: pid $pid, user dcrouter, CAP_NET_BIND_SERVICE only, no_new_privs, seccomp filter," \
     "$files descriptors; $workers worker process(es) likewise"
journalctl -u dcrouter --no-pager -o cat | grep -q 'dcrouter listening on 0.0.0.0:80' \
    || fail "the journal of dcrouter.service has no 'listening on' line"
echo "ok: journalctl -u dcrouter shows the daemon's log"

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
until_ok 5 body_is "$body" -k https://localhost/ || fail "the TLS route is not up after the reload"
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
until_ok 5 body_is "$body" -k https://localhost:8443/ \
    || fail "terminate-and-reencrypt, verified against the state's certificate"
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
restarted() {
    local new
    new=$(main_pid)
    [ "$new" != 0 ] && [ "$new" != "$pid" ] && curl -sS --max-time 1 http://127.0.0.1/ >/dev/null
}
until_ok 10 restarted || fail "no new main process answering 10 s after SIGKILL"
[ "$(systemctl show -p NRestarts --value dcrouter)" = 1 ] || fail "not restarted after SIGKILL"
echo "ok: Restart=on-failure brought it back after SIGKILL"

# -- reload under traffic: the listening sockets stay, no request fails ---------
sed -i 's/^body = .*/body = reloaded under traffic/' /etc/dcrouter.ini
python3 - "$body" <<'EOF' || fail "reload under traffic"
import socket, subprocess, sys, threading, time

old, new = sys.argv[1], "reloaded under traffic"

def listeners(port):
    """The inodes of the listening TCP sockets on port (every worker's)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(fields[9])
    return found

def get(sock=None):
    """GET / on a new connection (or the half-sent one given); the body."""
    if sock is None:
        sock = socket.create_connection(("127.0.0.1", 80), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with sock:
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise AssertionError(f"answer {head[:40]!r}")
    return payload.decode().rstrip("\n")  # (static bodies end with a newline)

before = listeners(80)
pending = socket.create_connection(("127.0.0.1", 80), timeout=5)
pending.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the rest after the reload
bodies, errors = [], []
stop = threading.Event()

def hammer():
    while not stop.is_set():
        try:
            bodies.append(get())
        except Exception as e:
            errors.append(repr(e))

thread = threading.Thread(target=hammer)
thread.start()
started = time.monotonic()
reload = subprocess.run(["systemctl", "reload", "dcrouter"], capture_output=True, text=True)
while time.monotonic() - started < 15 and (not bodies or bodies[-1] != new):
    time.sleep(0.05)
time.sleep(0.5)  # and some more traffic on the new configuration
stop.set()
thread.join()
pending.sendall(b"Connection: close\r\n\r\n")
late = get(pending)
after = listeners(80)
print(f"reload under traffic: {len(bodies)} requests, {len(errors)} failed;"
      f" {bodies.count(old)} old, {bodies.count(new)} new body; listeners {len(before)} -> {len(after)}")
assert reload.returncode == 0, reload.stderr
assert not errors, errors[:5]
assert set(bodies) <= {old, new}, set(bodies) - {old, new}
assert bodies and bodies[-1] == new, "the new body was never served"
assert late in (old, new), late
assert before and before == after, f"listening sockets changed: {before} -> {after}"
EOF
echo "ok: reload under traffic: no request failed, the half-sent one was answered, the listening sockets are the same"
cp /root/dcrouter.ini.orig /etc/dcrouter.ini

# -- what dcrouter does, under the hardening --------------------------------------
# ACME (pebble on 127.0.0.1:14000, http-01 through port 80, account and
# certificate in /var/lib/dcrouter), the authoritative DNS server on 53 (UDP
# and TCP; pebble and the container's resolver ask it), the mail edge on 25
# (queue fsynced in /var/lib/dcrouter, Maildir delivery, the MX loop check
# that reads the interface addresses over netlink), certificate files
# readable by the dcrouter group only, a spliced TCP forward.
mkdir -p /etc/dcrouter/tls
install -m 0644 /srv/pebble/ca.pem /etc/dcrouter/acme-ca.pem
install -o root -g dcrouter -m 0640 /srv/pebble/cert.pem /etc/dcrouter/tls/localhost.pem
install -o root -g dcrouter -m 0640 /srv/pebble/key.pem /etc/dcrouter/tls/localhost.key
chown root:dcrouter /etc/dcrouter/tls
chmod 0750 /etc/dcrouter/tls
echo "nameserver 127.0.0.1" > /etc/resolv.conf
cat > /srv/pebble/config.json <<'EOF'
{"pebble": {"listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
            "certificate": "/srv/pebble/cert.pem", "privateKey": "/srv/pebble/key.pem",
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
            "externalAccountBindingRequired": false}}
EOF
systemd-run -q --unit=pebble -E PEBBLE_VA_NOSLEEP=1 -E PEBBLE_WFE_NONCEREJECT=0 \
    /usr/local/bin/pebble -config /srv/pebble/config.json -strict=false -dnsserver 127.0.0.1:53
# (14000 is 36B0 in /proc/net/tcp; 0A: listening)
pebble_listens() { awk '$2 ~ /:36B0$/ && $4 == "0A"' /proc/net/tcp | grep -q .; }
until_ok 10 pebble_listens || fail "pebble does not listen on 14000: $(journalctl -u pebble --no-pager -n 20)"
cat > /etc/dcrouter.ini <<'EOF'
[dcrouter]
state_dir = /var/lib/dcrouter
log_format = text
drain_timeout = 3s
splice = yes

[defaults]
bind = 0.0.0.0

[acme]
enabled = yes
directory = https://127.0.0.1:14000/dir
ca_bundle = /etc/dcrouter/acme-ca.pem
challenge = http-01

[dns]
listen = 0.0.0.0:53

[dns.zone:app.test]
records =
    @    NS  ns1
    ns1  A   127.0.0.1
    @    A   127.0.0.1
    @    MX  10 mx
    mx   A   127.0.0.1

[dns.zone:loop.test]
records =
    @    NS  ns1.app.test.
    @    MX  10 mx.app.test.

[email]
hostname = mx.app.test
ports = 25
domains = app.test
default_mode = reject

[email.rule:*@app.test]
mode = local

[email.rule:*@loop.test]
mode = mta

[route:default]
ports = 80
action = static
status = 200
content_type = text/plain; charset=utf-8
body = features

[route:acme]
ports = 443
domains = app.test
tls = terminate
certificate = auto
action = static
status = 200
body = acme

[route:files]
ports = 4443
tls = terminate
cert = /etc/dcrouter/tls/localhost.pem
key = /etc/dcrouter/tls/localhost.key
action = static
status = 200
body = files

[route:spliced]
ports = 8080
action = forward
target = 127.0.0.1:80

[route:held]
ports = 9000
action = forward
target = 127.0.0.1:9001
EOF
mark=$(cursor)
systemctl restart dcrouter || fail "systemctl restart with ACME, DNS and mail"
until_ok 15 body_is features http://127.0.0.1/ || fail "no answer after the restart"

# DNS, over UDP and TCP, and through the C library's resolver.
python3 <<'EOF' || fail "DNS on port 53"
import socket, struct

def query(name, tcp):
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    msg = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)
    if tcp:
        with socket.create_connection(("127.0.0.1", 53), timeout=5) as s:
            s.sendall(struct.pack("!H", len(msg)) + msg)
            data = b""
            while len(data) < 2 or len(data) < 2 + struct.unpack("!H", data[:2])[0]:
                chunk = s.recv(4096)
                assert chunk, "TCP answer cut short"
                data += chunk
            answer = data[2:]
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(msg, ("127.0.0.1", 53))
            answer = s.recv(4096)
    ident, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", answer[:12])
    assert ident == 0x1234
    return flags & 0xF, ancount, answer

for tcp in (False, True):
    rcode, ancount, answer = query("app.test", tcp)
    assert rcode == 0 and ancount == 1 and answer.endswith(socket.inet_aton("127.0.0.1")), (rcode, ancount)
    rcode, _, _ = query("example.org", tcp)
    assert rcode == 5, f"outside the zones: rcode {rcode}, not REFUSED"
print("DNS: app.test A 127.0.0.1 over UDP and TCP; example.org REFUSED")
EOF
# (getent hosts, not ahosts: AI_ADDRCONFIG finds no address but loopback here)
[ "$(getent hosts mx.app.test | awk '{print $1}')" = 127.0.0.1 ] \
    || fail "getent hosts mx.app.test through /etc/resolv.conf -> 127.0.0.1:53"
echo "ok: the DNS server on port 53 (UDP, TCP, the system resolver)"

acme_stored() { journal_since "$mark" | grep -q 'certificate for app.test stored'; }
until_ok 60 acme_stored || fail "no ACME certificate for app.test in 60 s: $(journalctl -u pebble --no-pager -n 20)"
curl -sSk --max-time 5 https://127.0.0.1:15000/roots/0 > /root/pebble-root.pem \
    || fail "pebble's root certificate"
until_ok 10 body_is acme --cacert /root/pebble-root.pem https://app.test/ \
    || fail "https://app.test/ with the ACME certificate, verified against pebble's root"
[ -z "$(find /var/lib/dcrouter ! -user dcrouter)" ] \
    || fail "not owned by dcrouter in /var/lib/dcrouter: $(find /var/lib/dcrouter ! -user dcrouter)"
[ -z "$(find /var/lib/dcrouter/acme /var/lib/dcrouter/certs -type f -perm /077)" ] \
    || fail "ACME account or certificate key readable by others: $(ls -l /var/lib/dcrouter/acme /var/lib/dcrouter/certs)"
echo "ok: ACME http-01 against pebble: account and certificate stored (0600) in /var/lib/dcrouter, served and verified"

body_is files --cacert /srv/pebble/ca.pem https://localhost:4443/ \
    || fail "the route with cert/key files (root:dcrouter 0640 in a 0750 directory)"
echo "ok: certificate files readable through the dcrouter group"

body_is features http://127.0.0.1:8080/ || fail "the forward route on 8080"
spliced() {
    curl -sS --max-time 5 --unix-socket /var/lib/dcrouter/admin.sock http://localhost/metrics \
        | grep -q '^dcrouter_connections_spliced_total{route="spliced"} [1-9]'
}
until_ok 5 spliced || fail "the forward on 8080 was not spliced (metrics over the admin socket)"
echo "ok: TCP forward with splice(2) (seccomp @system-service); metrics over the admin socket"

python3 <<'EOF' || fail "SMTP on port 25"
import smtplib
with smtplib.SMTP("127.0.0.1", 25, timeout=10) as s:
    s.sendmail("", ["bob@app.test"], "From: a@example.org\r\nSubject: local\r\n\r\nto the Maildir\r\n")
    s.sendmail("", ["x@loop.test"], "From: a@example.org\r\nSubject: loop\r\n\r\nto myself\r\n")
EOF
delivered() { [ -n "$(find /var/lib/dcrouter/mail/maildir/app.test/bob/new -type f 2>/dev/null)" ]; }
until_ok 15 delivered || fail "no mail for bob@app.test in /var/lib/dcrouter/mail/maildir"
looped() { journal_since "$mark" | grep -q 'x@loop.test failed: 554 5.4.6'; }
until_ok 15 looped || fail "x@loop.test (MX: this server) did not fail with 5.4.6"
if journal_since "$mark" | grep -q "cannot read this machine's interface addresses"; then
    fail "the MX loop check cannot read the interface addresses (RestrictAddressFamilies without AF_NETLINK?)"
fi
echo "ok: SMTP on 25: queued (fsynced), delivered to a Maildir in /var/lib/dcrouter;" \
     "the MX loop check read the interface addresses"

bad=$(journalctl -u dcrouter --no-pager -o cat \
    | grep -E 'Traceback|Unhandled|Unable to write|Permission denied|Operation not permitted|Errno|Bad system call|Read-only file system' \
    || true)
[ -z "$bad" ] || fail "errors in the journal of dcrouter.service: $bad"
echo "ok: nothing in the journal of dcrouter.service is denied or unhandled"
systemctl stop pebble

systemd-analyze security dcrouter --no-pager | tail -1

# systemctl stop with a connection open through a worker: SIGTERM to twistd
# (KillMode=mixed), passed on to the workers, which drain it for
# drain_timeout (3s here), then everything exits before TimeoutStopSec.
# (9001 is 2329 in /proc/net/tcp; 0A: listening, 01: established)
systemd-run -q --unit=holder python3 -c '
import socket
server = socket.create_server(("127.0.0.1", 9001))
held = []
while True:
    held.append(server.accept()[0])
'
holder_listens() { awk '$2 ~ /:2329$/ && $4 == "0A"' /proc/net/tcp | grep -q .; }
until_ok 10 holder_listens || fail "the holder does not listen on 9001: $(systemctl status holder)"
python3 - > /root/held.log 2>&1 <<'EOF' &
import socket, time
client = socket.create_connection(("127.0.0.1", 9000), timeout=60)
client.sendall(b"held open")
print("connected", flush=True)
opened = time.monotonic()
try:
    how = f"closed ({client.recv(100)!r})"
except ConnectionResetError:
    how = "reset"
print(f"{how} by the router after {time.monotonic() - opened:.1f}s", flush=True)
EOF
client=$!
held_through() { awk '$2 ~ /:2329$/ && $4 == "01"' /proc/net/tcp | grep -q .; }
until_ok 10 held_through || fail "the forward on 9000 did not reach the holder on 9001: $(cat /root/held.log)"
stopped_at=$SECONDS
systemctl stop dcrouter
took=$((SECONDS - stopped_at))
wait "$client" || fail "the held connection: $(cat /root/held.log)"
systemctl stop holder
if systemctl is-active --quiet dcrouter; then
    fail "still active after systemctl stop"
fi
[ "$(systemctl show -p Result --value dcrouter)" = success ] \
    || fail "systemctl stop: Result=$(systemctl show -p Result --value dcrouter)"
! journal_since "$mark" | grep -Eq 'SIGKILL|timed out|Killing process' \
    || fail "systemctl stop killed: $(journal_since "$mark" | grep -E 'SIGKILL|timed out|Killing')"
if [ "$took" -lt 2 ] || [ "$took" -gt 15 ]; then
    fail "systemctl stop took ${took}s with drain_timeout = 3s"
fi
# (a worker's line reaches the journal through its stdout stream, maybe later)
drain_logged() { journal_since "$mark" | grep -q 'draining 1 connections'; }
until_ok 5 drain_logged || fail "no 'draining' line in the journal"
echo "ok: systemctl stop drained a held connection (drain_timeout 3s) in ${took}s," \
     "Result=success, nothing SIGKILLed; the client: $(tail -1 /root/held.log)"

# -- the maintainer scripts under a running systemd -------------------------------
# (apt installed the package before the first boot; here systemd runs.)
cp /root/dcrouter.ini.orig /etc/dcrouter.ini
systemctl start dcrouter || fail "systemctl start"
until_ok 15 body_is "$body" http://127.0.0.1/ || fail "no answer after systemctl start"
pid=$(main_pid)
deb=$(ls /srv/pkg/dcrouter_*.deb)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall \
    -o Dpkg::Options::=--force-confold "$deb" > /root/reinstall.log 2>&1 \
    || { cat /root/reinstall.log >&2; fail "apt-get install --reinstall"; }
until_ok 15 body_is "$body" http://127.0.0.1/ || fail "no answer after the upgrade"
[ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart dcrouter (main pid $pid)"
systemctl is-enabled --quiet dcrouter || fail "disabled by the upgrade"
echo "ok: an upgrade (apt-get install --reinstall) restarts the running service; it stays enabled"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q dcrouter > /root/remove.log 2>&1 \
    || { cat /root/remove.log >&2; fail "apt-get remove dcrouter"; }
! systemctl is-active --quiet dcrouter || fail "still active after apt-get remove"
! curl -sS --max-time 2 http://127.0.0.1/ >/dev/null 2>&1 || fail "port 80 still answers after apt-get remove"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q dcrouter > /root/purge.log 2>&1 \
    || { cat /root/purge.log >&2; fail "apt-get purge dcrouter"; }
left=$(ls -d /etc/dcrouter.ini /var/lib/dcrouter /etc/systemd/system/multi-user.target.wants/dcrouter.service \
    /lib/systemd/system/dcrouter.service 2>/dev/null || true)
[ -z "$left" ] || fail "left behind by apt-get purge: $left"
echo "ok: apt-get remove stops the service; purge leaves no state, configuration or enablement"
