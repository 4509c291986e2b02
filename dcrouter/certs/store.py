"""
Where the certificates dcrouter obtains (ACME) live: L{DirectoryStore}.

It holds every certificate in memory, parsed and checked (its key, and
that OpenSSL accepts the pair), so that a handshake never reads the disk;
all file I/O runs in the thread pool. No TLS context is kept here: what
serves a certificate builds its own, under the route's C{[tls]} policy and
ALPN (L{dcrouter.certs.manager.AutoTLS}).

Layout of a L{DirectoryStore} (C{<state_dir>/certs}, mode 0700): one file
per certificate, C{<first name>-<hash of the names>.pem}, holding the chain
(leaf first) and then the private key, mode 0600 (HAProxy reads the same
layout). A file is replaced whole (temporary file, fsync, rename, fsync of
the directory), so a crash leaves the old certificate or the new one, and
never a key beside a certificate it does not belong to.
"""

from __future__ import annotations

import builtins
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter import files
from dcrouter.certs.interfaces import ICertificateStore
from dcrouter.certs.material import CertificateEntry, CertificateError, buildEntry
from dcrouter.certs.names import lookupCandidates, normalizeNames
from dcrouter.config.model import CertificatePair
from dcrouter.threads import ThreadCalls

__all__ = ["DirectoryStore", "certificateFileName"]

Subscriber = Callable[[tuple[str, ...], Optional[CertificateEntry]], object]
StaticSubscriber = Callable[[CertificatePair, CertificateEntry], object]

#: Seconds a blocking file call may take before the caller gives up on it.
FILE_TIMEOUT = 30.0


def certificateFileName(names: Sequence[str]) -> str:
    """
    The file a certificate for C{names} (normalized) is kept in: readable,
    and unique per set of names.
    """
    digest = hashlib.sha256(",".join(names).encode("ascii")).hexdigest()[:12]
    first = names[0].replace("*", "_wildcard")
    return f"{first[:64]}-{digest}.pem"


class _Subscribers:
    """Callbacks told of changes; one that raises is logged and kept."""

    log = Logger()

    def __init__(self) -> None:
        self._callbacks: list[Callable[..., object]] = []

    def add(self, callback: Callable[..., object]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def notify(self, *args: Any) -> None:
        for callback in list(self._callbacks):
            try:
                callback(*args)
            except Exception:
                self.log.failure(
                    "certificate change subscriber {callback!r} failed", callback=callback
                )


@implementer(ICertificateStore)
class DirectoryStore:
    """
    The certificates dcrouter obtained, in a directory of the state dir.

    Call L{load} once at start (before listeners open, so that the first
    handshakes find their certificates); from then on L{get} answers from
    memory.
    """

    log = Logger()

    def __init__(
        self,
        directory: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        timeout: float = FILE_TIMEOUT,
        readOnly: bool = False,
    ) -> None:
        """
        @param directory: C{<state_dir>/certs}; created (0700) if missing.
        @param reactor: delivers results from the thread pool.
        @param threadpool: where file I/O and parsing run; its owner starts
            and stops it.
        @param clock: for the timeouts of those calls.
        @param readOnly: only read (a router worker following the
            supervisor's store): no directory made, no leftovers removed.
        """
        self.directory = directory
        self._clock = clock
        self._calls = ThreadCalls(reactor, threadpool, clock, timeout=timeout)
        self._byFile: dict[str, CertificateEntry] = {}
        self._index: dict[str, CertificateEntry] = {}
        self._subscribers = _Subscribers()
        self._writing = DeferredLock()
        self._readOnly = readOnly

    # -- reading, from memory -------------------------------------------------

    def get(self, serverName: Optional[str]) -> Optional[CertificateEntry]:
        """See L{ICertificateStore.get}."""
        if not serverName:
            return None
        now = self._clock.seconds()
        expired: Optional[CertificateEntry] = None
        for candidate in lookupCandidates(serverName):
            entry = self._index.get(candidate)
            if entry is None:
                continue
            if entry.notAfter.timestamp() > now:
                return entry
            expired = expired or entry
        return expired

    def find(self, names: Sequence[str]) -> Optional[CertificateEntry]:
        """See L{ICertificateStore.find}."""
        best: Optional[CertificateEntry] = None
        for entry in self._byFile.values():
            if entry.includes(names) and (best is None or entry.notAfter > best.notAfter):
                best = entry
        return best

    def list(self) -> list[CertificateEntry]:
        """See L{ICertificateStore.list}."""
        return list(self._byFile.values())

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """See L{ICertificateStore.subscribe}."""
        return self._subscribers.add(callback)

    # -- loading and writing, in the thread pool ----------------------------------

    def load(self) -> Deferred[None]:
        """
        Read every certificate of the directory into memory (replacing what
        was held) and delete temporary files a crash left. A file that
        cannot be used is logged and skipped.
        """
        d = self._calls.run(self._readAll)

        def loaded(result: tuple[dict[str, CertificateEntry], list[str]]) -> None:
            entries, problems = result
            for problem in problems:
                self.log.warn("certificate store: {problem}", problem=problem)
            self._byFile = entries
            self._reindex()
            self.log.info(
                "certificate store {directory}: {count} certificate(s) loaded",
                directory=self.directory,
                count=len(entries),
            )

        return d.addCallback(loaded)

    def _readAll(self) -> tuple[dict[str, CertificateEntry], builtins.list[str]]:
        problems: builtins.list[str] = []
        if self._readOnly:
            if not os.path.isdir(self.directory):
                return {}, problems
        else:
            files.ensureDirectory(self.directory)
            problems = [
                f"removed {n}, left by an interrupted write"
                for n in files.removeTemporaries(self.directory)
            ]
        entries: dict[str, CertificateEntry] = {}
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".pem"):
                continue
            path = os.path.join(self.directory, name)
            try:
                data = files.readFile(path)
                entries[name] = buildEntry(data, data, path)
            except OSError as e:
                problems.append(f"{path}: {e.strerror}")
            except CertificateError as e:
                problems.append(str(e))
        return entries, problems

    def store(
        self, names: Sequence[str], keyPEM: bytes, chainPEM: bytes
    ) -> Deferred[CertificateEntry]:
        """See L{ICertificateStore.store}."""
        try:
            key = normalizeNames(names)
        except ValueError as e:
            return fail(CertificateError(str(e)))
        fileName = certificateFileName(key)
        path = os.path.join(self.directory, fileName)

        def write() -> CertificateEntry:
            entry = buildEntry(keyPEM, chainPEM, path, requested=key)
            missing = [n for n in key if n not in entry.names]
            if missing:  # stored, it would replace one that has them
                raise CertificateError(
                    f"the certificate for {', '.join(key)} lacks {', '.join(missing)}"
                    f" (it names {', '.join(entry.names) or 'nothing'})"
                )
            files.ensureDirectory(self.directory)
            files.writeAtomically(path, entry.chainPEM + entry.keyPEM, 0o600)
            return entry

        def stored(entry: CertificateEntry) -> CertificateEntry:
            self._byFile[fileName] = entry
            self._reindex()
            self._subscribers.notify(key, entry)
            return entry

        return self._writing.run(self._calls.run, write).addCallback(stored)

    def remove(self, names: Sequence[str]) -> Deferred[None]:
        """See L{ICertificateStore.remove}."""
        key = normalizeNames(names)
        fileName = certificateFileName(key)
        if fileName not in self._byFile:
            return succeed(None)
        path = os.path.join(self.directory, fileName)

        def removed(_: object) -> None:
            if self._byFile.pop(fileName, None) is not None:
                self._reindex()
                self._subscribers.notify(key, None)

        d = self._writing.run(self._calls.run, files.removeDurably, path)
        return d.addCallback(removed)

    def _reindex(self) -> None:
        """Rebuild the name index: each name to the entry expiring last."""
        index: dict[str, CertificateEntry] = {}
        for entry in self._byFile.values():
            for name in entry.names:
                held = index.get(name)
                if held is None or entry.notAfter > held.notAfter:
                    index[name] = entry
        self._index = index
