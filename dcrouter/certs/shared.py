"""
ACME across router processes.

With C{workers > 1} the issuer runs once, in the supervisor, but a CA's
validation request reaches whichever worker the kernel picks. So the
supervisor's responders also publish each pending http-01 and tls-alpn-01
answer as a file under C{<state_dir>/acme-challenges/} (L{Published}), and
every worker answers from there (L{ChallengeFiles}).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Union

from OpenSSL import SSL
from zope.interface import implementer

from dcrouter import files
from dcrouter.certs.challenges import (
    ACME_CHALLENGE_PATH,
    HTTP01Responder,
    TLSALPN01Responder,
    validToken,
)
from dcrouter.certs.interfaces import IChallengeResponder

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
    """

    def __init__(self, responder: Union[HTTP01Responder, TLSALPN01Responder], stateDir: str):
        self.responder = responder
        self.challengeType = responder.challengeType
        self.directory = challengeDirectory(stateDir, self.challengeType)
        files.ensureDirectory(os.path.dirname(self.directory))
        files.ensureDirectory(self.directory)
        for name in os.listdir(self.directory):  # answers of an earlier run
            os.unlink(os.path.join(self.directory, name))

    def fileFor(self, name: str, token: str) -> str:
        if self.challengeType == "http-01":
            return os.path.join(self.directory, token)
        return os.path.join(self.directory, name.rstrip(".").lower())

    def start(self, name: str, token: str, keyAuthorization: str) -> None:
        """See L{IChallengeResponder.start}: answer, then publish."""
        self.responder.start(name, token, keyAuthorization)
        content = keyAuthorization if self.challengeType == "http-01" else (
            f"{token}\n{keyAuthorization}"
        )
        files.writeAtomically(self.fileFor(name, token), content.encode("ascii"), 0o600)

    def stop(self, name: str, token: str, keyAuthorization: str) -> None:
        """See L{IChallengeResponder.stop}: withdraw what no name still needs."""
        self.responder.stop(name, token, keyAuthorization)
        if isinstance(self.responder, HTTP01Responder):
            path = ACME_CHALLENGE_PATH + token.encode("ascii")
            stillWanted = self.responder.response(path) is not None
        else:
            stillWanted = self.responder.contextFor(name) is not None
        if not stillWanted:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.fileFor(name, token))


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
