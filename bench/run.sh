#!/usr/bin/env bash
# Proxy benchmark: dcrouter vs HAProxy vs nginx vs direct, in five suites:
# l4 (TCP passthrough), http (HTTP reverse proxy), https (the same,
# terminating TLS; keep-alive and new handshakes), idle (memory per idle
# connection), smtp (smtp-source -> smtp-sink, dcrouter with a forward rule).
# See bench/README.md. Options go to bench/bench.py (--help lists them);
# BENCH_DURATION, BENCH_ROUNDS, BENCH_ONLY (suites and/or targets, e.g.
# BENCH_ONLY=http,https), BENCH_METRICS, BENCH_WARMUP, BENCH_WORKERS,
# BENCH_IDLE_CONNS, BENCH_HAPROXY_SPLICE set the same from the environment.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

missing=()
for tool in curl wrk haproxy nginx openssl; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench: missing ${missing[*]}; run \`make deps-bench\` first" >&2
    exit 2
fi
if [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    echo "bench: libnginx-mod-stream missing (make deps-bench); nginx will be skipped in l4" >&2
fi
if ! command -v smtp-source >/dev/null 2>&1 && [ ! -x /usr/sbin/smtp-source ]; then
    echo "bench: smtp-source/smtp-sink missing (postfix; make deps-bench): the smtp suite cannot run" >&2
fi
if [ ! -x "$repo/.venv/bin/twistd" ]; then
    echo "bench: $repo/.venv/bin/twistd not found (make venv); dcrouter will be skipped" >&2
    echo "bench: (unless --venv names another venv with dcrouter installed)" >&2
fi

# Python for the harness: any python3 (standard library only); the venv's if
# there is one, so that it is the same interpreter everywhere.
py=python3
[ -x "$repo/.venv/bin/python" ] && py="$repo/.venv/bin/python"

echo "bench: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), kernel $(uname -r)"
echo "bench: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3), $(nginx -v 2>&1 | cut -d' ' -f3), $(curl --version | head -1 | cut -d' ' -f1-2), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(openssl version | cut -d' ' -f1-2)"
exec "$py" "$here/bench.py" "$@"
