"""
A route's guard at layer 7: rate limits first, then authentication; and
the route's gate (its IP lists and caps), which each request passes.

The rate limit is checked first, so that a flood never reaches bcrypt or the
LDAP server. Answers: 429 with C{Retry-After}; 401 with a challenge for
missing or wrong credentials or a bad token; 503 when the credential store
cannot answer (LDAP down) — never a pass.

Route keys (read for routes served at layer 7):
  - C{rate_limit_per_second}, C{rate_limit_per_minute}: per client address.
  - C{auth = basic} with C{auth_users} (C{name:bcrypt-or-pbkdf2-hash} list),
    C{auth = ldap} (basic, checked against C{[ldap]}), or C{auth = jwt} with
    C{jwt_key}, C{jwt_algorithms}, C{jwt_issuer}, C{jwt_audience},
    C{jwt_leeway}; C{auth_realm} names the realm in the challenge.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from attrs import frozen
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dcrouter.auth.jwtauth import ALGORITHMS, InvalidToken, JWTVerifier, bearerToken, isSecretKey
from dcrouter.auth.ldap import LDAPChecker
from dcrouter.auth.passwords import (
    AuthUnavailable,
    StaticPasswordChecker,
    basicCredentials,
    parseUsers,
)
from dcrouter.config import values
from dcrouter.config.model import LDAPSettings
from dcrouter.config.options import RouteOptions
from dcrouter.http.ratelimit import RateLimiter, retryAfter
from dcrouter.http.wire import HTTPError
from dcrouter.interfaces import IHTTPExchange
from dcrouter.net.gate import IPAddress, clientIP

log = Logger()

_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")


@frozen(eq=False)
class Guard:
    """What a route asks of a request before its action sees it."""

    limiter: Optional[RateLimiter] = None
    checker: Any = None
    jwt: Optional[JWTVerifier] = None
    realm: bytes = b"dcrouter"

    def check(self, exchange: IHTTPExchange) -> Union[bool, Deferred[bool]]:
        """C{True} to let the request through; otherwise it has been answered."""
        if self.limiter is not None:
            delay = self.limiter.check(clientKey(clientIP(exchange.connection.client)))
            if delay:
                exchange.record.note = "rate limited"
                exchange.respond(
                    429,
                    [(b"Retry-After", b"%d" % retryAfter(delay)), _TEXT],
                    b"too many requests\n",
                )
                return False
        if self.jwt is None and self.checker is None:
            return True
        authorizations = exchange.request.getAll(b"authorization")
        if len(authorizations) > 1:
            # Only one is checked, and all would be forwarded: a backend
            # reading another would see credentials nobody checked.
            exchange.record.note = "auth: more than one Authorization header"
            exchange.respond(400, [_TEXT], b"more than one Authorization header\n")
            return False
        authorization = authorizations[0] if authorizations else None
        if self.jwt is not None:
            token = bearerToken(authorization) if authorization else None
            if token is None:
                return self.refuse(exchange, b'Bearer realm="%s"' % self.realm, "no bearer token")
            try:
                self.jwt.verify(token)
            except InvalidToken as e:
                return self.refuse(
                    exchange, b'Bearer realm="%s", error="invalid_token"' % self.realm, e.reason
                )
            return True
        if self.checker is not None:
            credentials = basicCredentials(authorization)
            if credentials is None:
                return self.refuse(exchange, self.challenge(), "no credentials")
            user, password = credentials
            checking = self.checker.requestAvatarId(UsernamePassword(user, password))
            return checking.addCallbacks(
                lambda avatar: True, lambda failure: self.failed(exchange, failure)
            )
        return True

    def challenge(self) -> bytes:
        return b'Basic realm="%s", charset="UTF-8"' % self.realm

    def refuse(self, exchange: IHTTPExchange, challenge: bytes, why: str) -> bool:
        exchange.record.note = f"auth: {why}"
        exchange.respond(401, [(b"WWW-Authenticate", challenge), _TEXT], b"unauthorized\n")
        return False

    def failed(self, exchange: IHTTPExchange, failure: Failure) -> bool:
        if failure.check(UnauthorizedLogin):
            return self.refuse(exchange, self.challenge(), "bad credentials")
        if not failure.check(AuthUnavailable):
            log.failure("credential check failed", failure)
        exchange.record.note = f"auth unavailable: {failure.getErrorMessage()}"
        exchange.respond(503, [_TEXT], b"authentication unavailable\n")
        return False


def clientKey(ip: Optional[IPAddress]) -> bytes:
    """
    Who a rate limit counts: an IPv4 address, an IPv6 client's /64 (as the
    gate counts them: one host can hold a whole /64), or C{b""} off IP.
    """
    if ip is None:
        return b""
    packed = ip.packed
    return packed if len(packed) == 4 else packed[:8]


#: How a request is answered that its route's gate refused, by the reason
#: L{dcrouter.net.gate.Gate.admit} gives; any other reason (a cap, the
#: connection rate) is a 503, as nginx's limit_conn answers.
_GATE_ANSWERS = {
    "ip_block": (403, "the client address is blocked on this route (ip_block)"),
    "ip_allow": (403, "the client address is not allowed on this route (ip_allow)"),
}


def admitRequest(gate: Any, ip: Optional[IPAddress], record: Any) -> Optional[HTTPError]:
    """
    Pass a request through its route's gate (L{dcrouter.http.routes.HTTPRoute.gate},
    not C{None}): the answer to send if refused; else it is counted until
    its record is written.
    """
    refused = gate.admit(ip)
    if refused is not None:
        status, reason = _GATE_ANSWERS.get(refused, (503, f"route limit reached ({refused})"))
        return HTTPError(status, reason)
    record.onEnd = lambda: gate.release(ip)
    return None


def parseGuard(
    options: RouteOptions, threadpool: ThreadPool, ldap: Optional[LDAPSettings]
) -> Optional[Guard]:
    """Read a route's guard keys; C{None} when it sets none."""
    reactor = options.reactor
    perSecond = options.get("rate_limit_per_second", _rate, None)
    perMinute = options.get("rate_limit_per_minute", _rate, None)
    limiter = (
        RateLimiter(perSecond, perMinute, reactor)
        if perSecond is not None or perMinute is not None
        else None
    )
    kind = options.choice("auth", ("none", "basic", "ldap", "jwt"), "none")
    realm = options.text("auth_realm", "dcrouter")
    if any(c in realm for c in '"\\\r\n'):
        options.error("auth_realm", "must not contain quotes, backslashes or line breaks")
        realm = "dcrouter"
    checker: Any = None
    verifier = None
    users = options.raw("auth_users")
    jwtKeys = [key for key in options.route.options if key.startswith("jwt_")]
    if kind != "basic" and users is not None:
        options.error("auth_users", "only applies to auth = basic")
    if kind != "jwt":
        for key in jwtKeys:
            options.raw(key)
            options.error(key, "only applies to auth = jwt")
    if kind == "basic":
        if users is None:
            options.error("auth", "auth = basic needs auth_users (name:hash, ...)")
        else:
            try:
                checker = StaticPasswordChecker(
                    parseUsers(users.text), reactor, threadpool, reactor
                )
            except ValueError as e:
                options.error("auth_users", str(e))
    elif kind == "ldap":
        if ldap is None:
            options.error("auth", "auth = ldap needs an [ldap] section")
        else:
            checker = LDAPChecker(ldap, reactor, threadpool, reactor)
    elif kind == "jwt":
        verifier = _jwtVerifier(options)
    if limiter is None and checker is None and verifier is None:
        return None
    return Guard(limiter, checker, verifier, realm.encode("utf-8"))


def _rate(text: str) -> float:
    try:
        rate = float(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number of requests") from None
    if not 0 < rate <= 1e6:
        raise ValueError(f"{text.strip()} is not between 0 and 1000000")
    return rate


def _jwtVerifier(options: RouteOptions) -> Optional[JWTVerifier]:
    keyFile = options.path("jwt_key")
    rs256: tuple[str, ...] = ("RS256",)
    algorithms = options.get("jwt_algorithms", _algorithms, rs256)
    none: list[str] = []
    issuer = options.get("jwt_issuer", values.splitList, none)
    audience = options.get("jwt_audience", values.splitList, none)
    leeway = options.duration("jwt_leeway", 0.0)
    if keyFile is None:
        options.error(
            "auth", "auth = jwt needs jwt_key (a PEM public key, or a file with the secret)"
        )
        return None
    try:
        verifier = JWTVerifier.fromKeyFile(
            list(algorithms), keyFile, options.reactor,
            issuer=issuer or None, audience=audience or None, leeway=leeway,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        options.error("jwt_key", str(e))
        return None
    if isSecretKey(algorithms):
        options.warnIfExposed("jwt_key", keyFile)
    return verifier


def _algorithms(text: str) -> tuple[str, ...]:
    names = tuple(name.upper() for name in values.splitList(text))
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown or not names:
        raise ValueError(
            f"{', '.join(unknown) or 'none given'}: known are {', '.join(sorted(ALGORITHMS))}"
        )
    return names
