"""
The admin listener and the admin socket: metrics, status, operator commands.

C{/metrics} is the Prometheus exposition; C{/status.json} the state as
plain data; C{/} a page that shows it and refreshes itself, with no outside
assets. The operator's endpoints (L{OPERATOR_PATHS}: the certificates, the
mail queue, and the POSTs that renew, flush and delete) are what
C{dcrouter certs|queue} use.

Both serve the same resources, under different rules:
  - the admin socket (a UNIX socket, mode 0600, in the state directory):
    everything, without a password: only root and the daemon's user can
    connect, and the file's mode is the authorisation;
  - the TCP listener: the page, status and metrics are open on loopback
    (anywhere else C{[admin] users} must be set, and they need basic auth);
    the operator's endpoints always need C{[admin] users}' basic auth, even
    on loopback, where any local user could connect; without users they
    are refused (403), pointing to the socket.
A POST that carries an C{Origin} header (a browser page's) is refused on
both, so a web page cannot use an operator's cached credentials.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections import deque
from collections.abc import Callable
from ipaddress import ip_address
from typing import Any, Optional

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import ILogObserver, formatEvent
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from dcrouter.auth.passwords import AuthUnavailable, basicCredentials

#: What only an operator may ask for: on TCP, with C{[admin] users}' basic auth.
OPERATOR_PATHS = frozenset(
    {b"certs.json", b"certs/renew", b"queue.json", b"queue/flush", b"queue/delete"}
)


@implementer(ILogObserver)
class RecentErrors:
    """A log observer keeping the last warnings and errors, for the status page."""

    def __init__(self, clock: Any, size: int = 50) -> None:
        self.clock = clock
        self.events: deque[dict[str, Any]] = deque(maxlen=size)

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        name = getattr(level, "name", "")
        if name not in ("warn", "error", "critical") and "log_failure" not in event:
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {failure.getErrorMessage()}"
        self.events.append({
            "time": event.get("log_time", self.clock.seconds()),
            "namespace": event.get("log_namespace", "-"),
            "level": name or "error",
            "text": text[:500],
        })


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class _StatusJSON(Resource):
    isLeaf = True

    def __init__(self, status: Callable[[], Any]) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.status(), default=str).encode("utf-8")


_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dcrouter</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.5em}
table{border-collapse:collapse} td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}
.up{color:#080;font-weight:bold} .down{color:#b00;font-weight:bold} .muted{color:#777}
</style></head><body>
<h1>dcrouter <span id="summary" class="muted"></span></h1>
<h2>Listeners and routes</h2><table id="routes"></table>
<h2>Targets</h2><table id="targets"></table>
<h2>Certificates</h2><table id="certs"></table>
<h2>Mail queue</h2><table id="mail"></table>
<h2>Refused</h2><table id="refused"></table>
<h2>Recent warnings and errors</h2><table id="errors"></table>
<script>
function cell(row, text, cls){const td=row.insertCell();td.textContent=text;if(cls)td.className=cls;}
function fill(id, head, rows){
  const t=document.getElementById(id);t.textContent="";
  const h=t.createTHead().insertRow();head.forEach(x=>{const th=document.createElement("th");th.textContent=x;h.appendChild(th);});
  const b=t.createTBody();
  if(!rows.length){const r=b.insertRow();cell(r,"none","muted");return;}
  rows.forEach(cols=>{const r=b.insertRow();cols.forEach(c=>Array.isArray(c)?cell(r,c[0],c[1]):cell(r,c));});
}
async function refresh(){
  try{
    const s=await (await fetch("status.json",{cache:"no-store"})).json();
    document.getElementById("summary").textContent=
      `${s.connections.active} open, ${s.connections.accepted} accepted, up ${Math.round(s.uptime)} s`;
    fill("routes",["port","route","action","tls","domains"],
      s.routes.map(r=>[r.port,r.route,r.action,r.tls||"-",r.domains.join(", ")||"-"]));
    fill("targets",["pool","target","state","in flight","last change"],
      s.targets.map(t=>[t.pool,t.address,t.up?["up","up"]:["down","down"],t.active,t.lastReason||"-"]));
    fill("certs",["route","names","expires","next renewal","last error"],
      (s.certificates||[]).map(c=>[c.route,(c.names||[]).join(", "),c.notAfter||"-",c.nextRenewal||"-",c.lastError||"-"]));
    fill("mail",["what","count"],s.mail?Object.entries(s.mail):[]);
    fill("refused",["reason","count"],Object.entries(s.connections.refused));
    fill("errors",["time","where","what"],
      s.errors.slice().reverse().map(e=>[new Date(e.time*1000).toISOString(),e.namespace,e.text]));
  }catch(e){document.getElementById("summary").textContent="(status unavailable)";}
}
refresh();setInterval(refresh,2000);
</script></body></html>
"""


class _RenewCertificate(Resource):
    """C{POST certs/renew} with C{name=...}: issue that certificate now."""

    isLeaf = True

    def __init__(self, renew: Optional[Callable[[str], Any]]) -> None:
        super().__init__()
        self.renew = renew

    def render_POST(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        names = (request.args or {}).get(b"name") or []
        if self.renew is None:
            request.setResponseCode(404)
            return b"no ACME here ([acme] enabled = no)\n"
        if len(names) != 1:
            request.setResponseCode(400)
            return b"give one name=\n"
        name = names[0].decode("utf-8", "replace")
        try:
            self.renew(name)
        except KeyError:
            request.setResponseCode(404)
            return f"no route wants a certificate for {name}\n".encode()
        request.setResponseCode(202)
        return f"renewing the certificate of {name}; see certs.json\n".encode()


class _QueueAction(Resource):
    """C{POST queue/flush} (optional C{id=...}) and C{POST queue/delete} (C{id=...})."""

    isLeaf = True

    def __init__(self, act: Optional[Callable[[list[str]], Any]], needsIds: bool) -> None:
        super().__init__()
        self.act = act
        self.needsIds = needsIds

    def render_POST(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.act is None:
            request.setResponseCode(404)
            return b"no mail queue here ([email] is not configured)\n"
        ids = [v.decode("ascii", "replace") for v in (request.args or {}).get(b"id", [])]
        if self.needsIds and not ids:
            request.setResponseCode(400)
            return b"give id=...\n"
        result = maybeDeferred(self.act, ids)

        def done(text: str) -> None:
            request.write(f"{text}\n".encode())
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(f"{failure.getErrorMessage()}\n".encode())
            request.finish()

        result.addCallbacks(done, failed)
        return NOT_DONE_YET


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; script-src 'unsafe-inline' 'self'; "
                          b"style-src 'unsafe-inline'")
        return _PAGE


def _addressedByAddress(host: Optional[bytes]) -> bool:
    """
    Does the C{Host} header name an IP address or C{localhost}?

    The open loopback listener answers nothing else: a web page whose name
    an attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name.
    """
    if not host:
        return False
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    if text == "localhost":
        return True
    try:
        ip_address(text)
    except ValueError:
        return False
    return True


class _Guarded(Resource):
    """
    Serves the children by path, under the listener's rules (see the module
    docstring): C{local}, the admin socket's, or else the TCP listener's,
    where C{checker} (C{[admin] users}, or C{None}) guards.
    """

    def __init__(
        self, children: dict[bytes, Resource], checker: Optional[Any], local: bool
    ) -> None:
        super().__init__()
        self.children_ = children
        self.checker = checker
        self.local = local

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self

    def render(self, request: Request) -> Any:
        path = b"/".join(request.prepath or [])
        child = self.children_.get(path)
        if child is None:
            request.setResponseCode(404)
            return b"not found\n"
        if request.method == b"POST" and request.getHeader(b"origin") is not None:
            return _refuse(request, b"refused: a web page may not send operator commands\n")
        if self.local:
            return child.render(request)
        if self.checker is None:
            if not _addressedByAddress(request.getHeader(b"host")):
                return _refuse(
                    request,
                    b"refused: ask by address (http://127.0.0.1:PORT/) or localhost, not by"
                    b" another name (a DNS rebinding guard)\n",
                )
            if path in OPERATOR_PATHS:
                return _refuse(
                    request,
                    b"refused: operator commands are served on the admin socket (run dcrouter"
                    b" certs|queue as root or the daemon's user), or here to [admin] users\n",
                )
            return child.render(request)
        credentials = basicCredentials(request.getHeader(b"authorization"))
        if credentials is None:
            return self.challenge(request)
        checking = self.checker.requestAvatarId(UsernamePassword(*credentials))

        def allowed(_: object) -> None:
            # Rendered after the check, not by twisted.web's Request.render,
            # whose answers to a method the child does not take (405) and to
            # an error (500) are given here.
            try:
                body = child.render(request)
            except UnsupportedMethod as e:
                request.setResponseCode(405)
                request.setHeader(b"allow", b", ".join(e.allowedMethods))
                body = b"method not allowed\n"
            except Exception:
                request.processingFailed(Failure())
                return
            if body is not NOT_DONE_YET:
                request.write(body)
                request.finish()

        def refused(failure: Failure) -> None:
            if failure.check(UnauthorizedLogin):
                request.write(self.challenge(request))
            elif failure.check(AuthUnavailable):
                # Not a wrong password: the check could not be made.
                request.setResponseCode(503)
                request.write(b"authentication unavailable\n")
            else:
                request.processingFailed(failure)
                return
            request.finish()

        checking.addCallbacks(allowed, refused)
        return NOT_DONE_YET

    @staticmethod
    def challenge(request: Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Basic realm="dcrouter admin"')
        return b"unauthorized\n"


def _refuse(request: Request, text: bytes) -> bytes:
    request.setResponseCode(403)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text


def _deleteAll(queue: Any, ids: list[str]) -> Any:
    d = gatherResults([queue.delete(queueId) for queueId in ids])
    return d.addCallback(lambda found: f"{sum(found)} of {len(ids)} message(s) deleted")


def adminSite(
    registry: CollectorRegistry,
    status: Callable[[], dict[str, Any]],
    checker: Optional[Any],
    certificates: Callable[[], Any] = list,
    renew: Optional[Callable[[str], Any]] = None,
    queue: Optional[Any] = None,
    local: bool = False,
) -> Site:
    """
    The site of the admin listener or, with C{local}, of the admin socket.

    @param checker: C{[admin] users}, for the TCP listener; C{None}: none.
    """
    root = _Guarded(
        {
            b"": _Page(),
            b"metrics": _Metrics(registry),
            b"status.json": _StatusJSON(status),
            b"certs.json": _StatusJSON(certificates),
            b"certs/renew": _RenewCertificate(renew),
            b"queue.json": _StatusJSON(queue.list if queue is not None else list),
            b"queue/flush": _QueueAction(
                (lambda ids: f"{queue.flush(ids or None)} message(s) to be tried now")
                if queue is not None else None,
                needsIds=False,
            ),
            b"queue/delete": _QueueAction(
                (lambda ids: _deleteAll(queue, ids)) if queue is not None else None,
                needsIds=True,
            ),
        },
        checker,
        local,
    )
    site = Site(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


def listenAdminSocket(reactor: Any, path: str, site: Site) -> IListeningPort:
    """
    Serve C{site} on the UNIX socket C{path}, mode 0600 from its creation on,
    in a directory made (0700) if missing. A socket file that no process
    answers on (a daemon that died) is replaced; one that answers is not.

    @param reactor: an C{IReactorUNIX}.
    @raise CannotListenError: the socket cannot be made.
    """
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        _removeStale(path)
    except OSError as e:
        raise CannotListenError(None, path, e) from None
    previous = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, site, mode=0o600)
    finally:
        os.umask(previous)


def _removeStale(path: str) -> None:
    """Remove C{path} if it is a socket no one listens on; refuse anything else there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CannotListenError(None, path, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise CannotListenError(None, path, "another process answers on it (a dcrouter running?)")
