#!/usr/bin/env python3
"""
Print what to point curl/openssl at for a dcrouter config (default
conf/dev.ini). Standard library only; reads only the route sections.

For each [route:NAME]: its ports, and a guess of the client command from
action/tls/domains. If the file cannot be read, falls back to the ports the
dev config is meant to have (8080 http, 8443 https, 9443 passthrough).
"""

import configparser
import sys


def first_port(spec: str) -> str:
    first = spec.replace(",", " ").split()[0]
    return first.split("-")[0]


def main(path: str) -> int:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        if not parser.read(path):
            raise OSError("cannot read")
    except (OSError, configparser.Error) as e:
        print(f"(could not read {path}: {e}; showing the usual dev ports)")
        print("  curl http://127.0.0.1:8080/")
        print("  curl -k https://localhost:8443/")
        print("  openssl s_client -connect 127.0.0.1:9443 -servername localhost")
        return 0

    routes = [s for s in parser.sections() if s.startswith("route:")]
    print(f"dcrouter dev routes from {path}:")
    for section in routes:
        r = parser[section]
        ports = r.get("ports", "").strip()
        if not ports:
            continue
        port = first_port(ports)
        bind = r.get("bind", "127.0.0.1").strip() or "127.0.0.1"
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        action = r.get("action", "forward").strip()
        tls = r.get("tls", "").strip()
        domains = r.get("domains", "").replace(",", " ").split()
        sni = next((d for d in domains if "*" not in d), None)
        if sni is None and domains:
            sni = domains[0].replace("*", "x")
        sni = sni or "localhost"
        has_cert = bool(r.get("cert") or r.get("certificate"))
        print(f"  [{section}] ports={ports} action={action}" + (f" tls={tls}" if tls else ""))
        if tls == "passthrough":
            cmd = f"openssl s_client -connect {host}:{port} -servername {sni}"
        elif tls.startswith("terminate") or has_cert:
            if sni == "localhost":
                cmd = f"curl -k https://localhost:{port}/"
            else:
                cmd = f"curl -k --resolve {sni}:{port}:{host} https://{sni}:{port}/"
        elif action == "forward":
            cmd = f"nc {host} {port}   # plain TCP forward"
        else:
            cmd = f"curl http://{host}:{port}/"
        print(f"      {cmd}")
    if not routes:
        print("  (no [route:...] sections)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "conf/dev.ini"))
