"""
ACME across router processes.

With C{workers > 1} the issuer runs once, in the supervisor, but a CA's
validation request reaches whichever worker the kernel picks. So the
supervisor's responders also publish each pending http-01 and tls-alpn-01
answer as a file under C{<state_dir>/acme-challenges/} (L{Published}), and
every worker answers from there (L{ChallengeFiles}).

The files are written and removed in the thread pool (each write is
fsynced), never on the reactor thread; L{Published.start} fires once the
answer is on disk, so the issuer tells the CA to validate only then.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter import files
from dcrouter.certs.challenges import (
    ACME_CHALLENGE_PATH,
    HTTP01Responder,
    TLSALPN01Responder,
    validToken,
)
from dcrouter.certs.interfaces import IChallengeResponder
from dcrouter.certs.store import FILE_TIMEOUT
from dcrouter.threads import ThreadCalls

#: Under the state directory: one folder per challenge type.
CHALLENGES_DIR = "acme-challenges"


def challengeDirectory(stateDir: str, challengeType: str) -> str:
    return os.path.join(stateDir, CHALLENGES_DIR, challengeType)


@implementer(IChallengeResponder)
class Published:
    """
    A responder that also publishes what it answers, for the workers:
    http-01 as C{http-01/<token>} holding the key authorization, tls-alpn-01
    as C{tls-alpn-01/<name>} holding the token and the key authorization.

    The in-memory responder answers at once; the files are written and
    removed one at a time, in the order asked, in the thread pool.
    """

    def __init__(
        self,
        responder: Union[HTTP01Responder, TLSALPN01Responder],
        stateDir: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        timeout: float = FILE_TIMEOUT,
    ) -> None:
        """
        Clears the answers an earlier run left (blocking: at start-up).

        @param reactor: delivers results from the thread pool.
        @param threadpool: where the files are written and removed.
        @param clock: for the timeouts of those calls.
        """
        self.responder = responder
        self.challengeType = responder.challengeType
        self.directory = challengeDirectory(stateDir, self.challengeType)
        self._calls = ThreadCalls(reactor, threadpool, clock, timeout=timeout)
        self._writing = DeferredLock()
        files.ensureDirectory(os.path.dirname(self.directory))
        files.ensureDirectory(self.directory)
        for name in os.listdir(self.directory):  # answers of an earlier run
            os.unlink(os.path.join(self.directory, name))

    def fileFor(self, name: str, token: str) -> str:
        if self.challengeType == "http-01":
            return os.path.join(self.directory, token)
        return os.path.join(self.directory, name.rstrip(".").lower())

    def start(self, name: str, token: str, keyAuthorization: str) -> Deferred[None]:
        """
        See L{IChallengeResponder.start}: answer, then publish.

        @return: fires once the answer is on disk; fails if it cannot be
            written (the in-memory answer is then withdrawn too).
        """
        self.responder.start(name, token, keyAuthorization)
        content = keyAuthorization if self.challengeType == "http-01" else (
            f"{token}\n{keyAuthorization}"
        )
        d = self._writing.run(
            self._calls.run,
            files.writeAtomically,
            self.fileFor(name, token),
            content.encode("ascii"),
            0o600,
        )

        def notPublished(failure: Failure) -> Failure:
            self.responder.stop(name, token, keyAuthorization)
            return failure

        return d.addCallbacks(lambda _: None, notPublished)

    def stop(self, name: str, token: str, keyAuthorization: str) -> Deferred[None]:
        """
        See L{IChallengeResponder.stop}: withdraw what no name still needs.

        @return: fires once the file is gone (or kept, for another name).
        """
        self.responder.stop(name, token, keyAuthorization)
        path = self.fileFor(name, token)

        def remove() -> Deferred[None]:
            # Decided when the earlier writes are done: an answer started
            # again meanwhile keeps its file.
            if self._stillWanted(name, token):
                return succeed(None)
            return self._calls.run(files.removeDurably, path).addCallback(lambda _: None)

        return self._writing.run(remove)

    def _stillWanted(self, name: str, token: str) -> bool:
        if isinstance(self.responder, HTTP01Responder):
            return self.responder.response(ACME_CHALLENGE_PATH + token.encode("ascii")) is not None
        return self.responder.contextFor(name) is not None


class ChallengeFiles:
    """A worker's answers to http-01 and tls-alpn-01, from the published files."""

    def __init__(self, stateDir: str) -> None:
        self.http01Directory = challengeDirectory(stateDir, "http-01")
        self.tlsDirectory = challengeDirectory(stateDir, "tls-alpn-01")
        #: tls-alpn-01 responders by name, rebuilt when the published answer changes.
        self.tls: dict[str, tuple[str, TLSALPN01Responder]] = {}

    def response(self, path: bytes) -> Optional[bytes]:
        """As L{HTTP01Responder.response}, from the supervisor's files."""
        if not path.startswith(ACME_CHALLENGE_PATH):
            return None
        token = path[len(ACME_CHALLENGE_PATH):]
        if not validToken(token):
            return None
        try:
            return files.readFile(os.path.join(self.http01Directory, token.decode("ascii")))
        except OSError:
            return None

    def contextFor(self, serverName: Optional[str]) -> Optional[SSL.Context]:
        """As L{TLSALPN01Responder.contextFor}, from the supervisor's files."""
        if not serverName or "/" in serverName or serverName.startswith("."):
            return None
        name = serverName.rstrip(".").lower()
        try:
            published = files.readFile(os.path.join(self.tlsDirectory, name)).decode("ascii")
        except (OSError, UnicodeDecodeError):
            self.tls.pop(name, None)
            return None
        held = self.tls.get(name)
        if held is None or held[0] != published:
            token, _, keyAuthorization = published.partition("\n")
            responder = TLSALPN01Responder()
            try:
                responder.start(name, token, keyAuthorization)
            except ValueError:
                return None
            held = self.tls[name] = (published, responder)
        return held[1].contextFor(name)
