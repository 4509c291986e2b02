"""
The C{dcrouter} command: operator tools beside the daemon.

C{dcrouter checkconfig FILE} checks a configuration exactly as a start or a
reload would (without binding ports), prints every error and exits 1, or
prints its warnings (a secret file every user can read) and a one-line
summary and exits 0. C{dcrouter routes FILE} prints the
route table in match order; with C{--explain HOST PORT [PATH]} it says which
route a connection (and an HTTP request) for HOST on PORT would get, and why.
C{dcrouter certs FILE} and C{dcrouter queue FILE} ask the running daemon,
over its admin socket (root or the daemon's user), or with C{--user} over
its C{[admin]} listener.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from collections.abc import Sequence
from typing import Any, Optional

from dcrouter.compile import checkConfigFile
from dcrouter.config.errors import ConfigErrors


def checkconfig(path: str) -> int:
    try:
        compiled = checkConfigFile(path)
    except ConfigErrors as e:
        print(e.report(), file=sys.stderr)
        print(f"{path}: {len(e.errors)} error(s)", file=sys.stderr)
        return 1
    config = compiled.config
    listeners = sorted(compiled.listenKeys())
    for warning in compiled.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    warned = f", {len(compiled.warnings)} warning(s)" if compiled.warnings else ""
    print(
        f"{path}: OK, {len(config.routes)} route(s) on {len(compiled.tables)} port(s), "
        f"{len(listeners)} listener(s){warned}"
    )
    return 0


def routes(path: str) -> int:
    """Print the compiled route table in match order."""
    try:
        compiled = checkConfigFile(path)
    except ConfigErrors as e:
        print(e.report(), file=sys.stderr)
        return 1
    for port in sorted(compiled.tables):
        for line in compiled.tables[port].explain():
            print(line)
    return 0


def explain(
    path: str, host: str, port: int, target: str, method: str, client: Optional[str],
    plain: bool,
) -> int:
    """Say which route would serve HOST on PORT (and PATH, over HTTP), and why."""
    import urllib.parse
    from ipaddress import ip_address

    from dcrouter.http.routes import ADD_SLASH, hostName
    from dcrouter.http.server import HTTPLayer, requestPath

    try:
        ip = ip_address(client) if client else None
    except ValueError:
        print(f"dcrouter routes: --client {client!r} is not an IP address", file=sys.stderr)
        return 2
    try:
        name = hostName(host.encode("idna"))
    except UnicodeError:
        print(f"dcrouter routes: --explain {host!r} is not a host name", file=sys.stderr)
        return 2
    try:
        requestTarget = target.encode("latin-1")
    except UnicodeEncodeError:
        quoted = urllib.parse.quote(target, safe="/?&=;:@!$'()*+,~%")
        print(f"dcrouter routes: --explain path {target!r} is not as a request sends it:"
              f" percent-encode it ({quoted})", file=sys.stderr)
        return 2
    try:
        compiled = checkConfigFile(path)
    except ConfigErrors as e:
        print(e.report(), file=sys.stderr)
        return 1
    table = compiled.tables.get(port)
    if table is None:
        ports = ", ".join(map(str, sorted(compiled.tables)))
        print(f"nothing listens on port {port} (ports: {ports})")
        return 1
    isTLS = not plain and any(route.config.tls for route in table.routes)
    route = table.match(name if isTLS else None, ip, isTLS)
    how = f"TLS with SNI {name}" if isTLS else "plain TCP"
    if route is None:
        print(f"port {port}, {how}: no route; the connection is closed")
        return 1
    config = route.config
    if route is table.fallback:
        print(f"port {port}, {how}: no route matches; [defaults] target takes it")
        return 0
    why = ", ".join(filter(None, (
        f"priority {config.priority}",
        f"domains {', '.join(config.domains)}" if config.domains and isTLS else "any name",
        f"client_ip {', '.join(map(str, config.client_ip))}" if config.client_ip else "",
        f"tls {config.tls}" if config.tls else "",
    )))
    if not isinstance(route.action, HTTPLayer):
        print(f"port {port}, {how}: [route:{config.name}] action {config.action} ({why})")
        return 0
    layer = route.action
    httpTable = layer.secure if isTLS else layer.plain
    found = httpTable.match(name, requestPath(requestTarget), method.upper(), _NoHeaders(), ip)
    print(f"port {port}, {how}: the HTTP layer ({why})")
    if found is None:
        print(f"  {method.upper()} {target} Host {name}: no route; the answer is 404")
        return 1
    found_ = found.config
    detail = ", ".join(filter(None, (
        f"priority {found_.priority}",
        f"domains {', '.join(found_.domains)}" if found_.domains else "any host",
        f"path {', '.join(found_.paths)}" if found_.paths else "",
        f"method {', '.join(found_.methods)}" if found_.methods else "",
        "headers " + ", ".join(f"{n}: {v}" for n, v in found_.headers) if found_.headers else "",
    )))
    if found.action is ADD_SLASH:
        status = 301 if method.upper() in ("GET", "HEAD") else 308
        print(f"  {method.upper()} {target} Host {name}: {status} to the path with a / added,"
              f" which [route:{found_.name}] serves ({detail})")
        return 0
    print(f"  {method.upper()} {target} Host {name}: [route:{found_.name}] "
          f"action {found_.action} ({detail})")
    if found_.headers:
        print("  (header conditions are assumed unmet by --explain unless no other route matches)")
    return 0


def askDaemon(
    path: str, user: Optional[str], what: str, form: Optional[list[tuple[str, str]]] = None
) -> Any:
    """
    GET (or, with C{form}, POST) C{what} on the running daemon: over its
    admin socket, or, with C{user}, over its C{[admin]} listener with basic
    auth, the password coming from C{DCROUTER_ADMIN_PASSWORD}.

    @return: the JSON (GET) or text (POST) answer.
    @raise SystemExit: with a message, when the daemon cannot be asked.
    """
    import base64
    import os
    import urllib.parse

    from dcrouter.config import loadConfig

    try:
        admin = loadConfig(path).admin
    except ConfigErrors as e:
        raise SystemExit(e.report()) from None
    headers = {"Host": "localhost"}
    connection: http.client.HTTPConnection
    if user:
        listen = admin.listen
        if listen is None:
            raise SystemExit(f"{path}: no [admin] listen: --user has nothing to talk to")
        where = str(listen)
        connection = http.client.HTTPConnection(listen.host, listen.port, timeout=10)
        password = os.environ.get("DCROUTER_ADMIN_PASSWORD", "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    else:
        if admin.socket is None:
            raise SystemExit(f"{path}: [admin] socket = off: ask over [admin] listen with --user")
        where = admin.socket
        connection = _UnixHTTPConnection(admin.socket, timeout=10)
    body = None
    if form is not None:
        body = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        connection.request("POST" if form is not None else "GET", f"/{what}", body, headers)
        answer = connection.getresponse()
        data = answer.read()
    except PermissionError:
        raise SystemExit(
            f"cannot use {where}: permission denied (run as root or as the daemon's user)"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise SystemExit(f"cannot reach the daemon at {where}: {e}") from None
    finally:
        connection.close()
    if answer.status >= 400:
        raise SystemExit(f"{answer.status}: {data.decode(errors='replace').strip()}")
    return data.decode().strip() if form is not None else json.loads(data)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the daemon's admin UNIX socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def certs(path: str, renew: Optional[str], user: Optional[str]) -> int:
    """List the ACME certificates of the running daemon, or renew one."""
    if renew:
        print(askDaemon(path, user, "certs/renew", [("name", renew)]))
        return 0
    entries = askDaemon(path, user, "certs.json")
    if not entries:
        print("no certificate = auto routes")
    for entry in entries:
        print(f"[route:{entry.get('route')}] {', '.join(entry.get('names', []))}")
        for key in ("state", "issuer", "notAfter", "nextRenewal", "failures", "lastError"):
            if entry.get(key) not in (None, "", 0):
                print(f"    {key}: {entry[key]}")
    return 0


def queue(path: str, action: Optional[str], ids: list[str], user: Optional[str]) -> int:
    """The running daemon's mail queue: list it, flush it (or some), delete messages."""
    if action == "flush":
        print(askDaemon(path, user, "queue/flush", [("id", i) for i in ids]))
        return 0
    if action == "delete":
        print(askDaemon(path, user, "queue/delete", [("id", i) for i in ids]))
        return 0
    messages = askDaemon(path, user, "queue.json")
    if not messages:
        print("the queue is empty")
    for message in messages:
        print(json.dumps(message, default=str))
    return 0


USER_HELP = (
    "ask over [admin] listen as this [admin] user (password in DCROUTER_ADMIN_PASSWORD)"
    " instead of over the admin socket"
)


class _NoHeaders:
    def getAll(self, name: bytes) -> list[bytes]:
        return []


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dcrouter", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("checkconfig", help="check a configuration file")
    check.add_argument("file")
    table = commands.add_parser("routes", help="print the route table in match order")
    table.add_argument("file")
    table.add_argument("--explain", nargs="+", metavar=("HOST", "PORT"),
                       help="HOST PORT [PATH]: which route would serve it, and why")
    table.add_argument("--method", default="GET", help="with --explain: the HTTP method")
    table.add_argument("--client", help="with --explain: the client's address")
    table.add_argument("--plain", action="store_true",
                       help="with --explain: a plain (not TLS) connection on a TLS port")
    certificates = commands.add_parser(
        "certs", help="the running daemon's ACME certificates, or renew one"
    )
    certificates.add_argument("file")
    certificates.add_argument("action", nargs="?", choices=["renew"])
    certificates.add_argument("name", nargs="?")
    certificates.add_argument("--user", help=USER_HELP)
    mail = commands.add_parser("queue", help="the running daemon's mail queue")
    mail.add_argument("file")
    mail.add_argument("action", nargs="?", choices=["flush", "delete"])
    mail.add_argument("ids", nargs="*", metavar="ID")
    mail.add_argument("--user", help=USER_HELP)
    args = parser.parse_args(argv)
    if args.command == "queue":
        if args.action == "delete" and not args.ids:
            parser.error("queue FILE delete ID...")
        return queue(args.file, args.action, args.ids, args.user)
    if args.command == "certs":
        if args.action == "renew" and not args.name:
            parser.error("certs FILE renew NAME")
        return certs(args.file, args.name if args.action else None, args.user)
    if args.command == "checkconfig":
        return checkconfig(args.file)
    if args.explain:
        if len(args.explain) not in (2, 3) or not args.explain[1].isdigit():
            parser.error("--explain takes HOST PORT [PATH]")
        host, port = args.explain[0], int(args.explain[1])
        target = args.explain[2] if len(args.explain) == 3 else "/"
        return explain(args.file, host, port, target, args.method, args.client, args.plain)
    return routes(args.file)


if __name__ == "__main__":
    sys.exit(main())
