"""
Where certificates live: L{DirectoryStore} for the ones dcrouter obtains
(ACME), L{StaticCertificates} for the files a route names.

Both hold every certificate in memory, parsed and its key checked, so that
a handshake never reads the disk; all file I/O runs in the thread pool. No
TLS context is built here: what serves a certificate builds its own, under
the route's C{[tls]} policy and ALPN (L{dcrouter.certs.manager.AutoTLS}).

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

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from dcrouter.certs import files
from dcrouter.certs.interfaces import ICertificateStore
from dcrouter.certs.material import CertificateEntry, CertificateError, buildEntry
from dcrouter.certs.names import lookupCandidates, normalizeNames
from dcrouter.config.model import CertificatePair
from dcrouter.threads import ThreadCalls

__all__ = ["DirectoryStore", "StaticCertificates", "certificateFileName"]

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
        for candidate in lookupCandidates(serverName):
            entry = self._index.get(candidate)
            if entry is not None:
                return entry
        return None

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


@frozen
class _Signature:
    """What tells a changed file: modification time, size, inode."""

    mtime: int
    size: int
    inode: int


def _signature(path: str) -> Optional[_Signature]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Signature(st.st_mtime_ns, st.st_size, st.st_ino)


_Signatures = tuple[Optional[_Signature], Optional[_Signature]]


class _Watched:
    """One certificate file pair and what was last read from it."""

    def __init__(self, pair: CertificatePair) -> None:
        self.pair = pair
        self.entry: Optional[CertificateEntry] = None
        self.seen: tuple[Optional[_Signature], Optional[_Signature]] = (None, None)
        self.error: Optional[str] = None


class StaticCertificates(Service):
    """
    The certificate files routes name (C{cert} and C{key}), kept current.

    Every C{interval} seconds (on the injected clock) the files' mtimes,
    sizes and inodes are compared with what was last read; a changed pair
    is read again, and L{reload} (SIGHUP) reads every pair whatever the
    mtimes say. A new pair that is unusable (a key written before its
    certificate, say) is logged and the old one keeps serving; it is
    tried again when a file changes again. Subscribers (L{subscribe}) are
    told of each new certificate.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool,
        clock: IReactorTime,
        *,
        interval: float = 60.0,
        timeout: float = FILE_TIMEOUT,
        readOnly: bool = False,
    ) -> None:
        self._clock = clock
        self._calls = ThreadCalls(reactor, threadpool, clock, timeout=timeout)
        self._interval = interval
        self._watched: dict[CertificatePair, _Watched] = {}
        self._subscribers = _Subscribers()
        self._loop: Optional[LoopingCall] = None
        self._polling: Optional[Deferred[list[CertificatePair]]] = None

    def get(self, pair: CertificatePair) -> Optional[CertificateEntry]:
        """The certificate last read from C{pair}, or C{None} if never read."""
        watched = self._watched.get(pair)
        return watched.entry if watched is not None else None

    def error(self, pair: CertificatePair) -> Optional[str]:
        """Why the files of C{pair} were last refused, for status; C{None} if fine."""
        watched = self._watched.get(pair)
        return watched.error if watched is not None else None

    def pairs(self) -> list[CertificatePair]:
        """Every pair watched."""
        return list(self._watched)

    def subscribe(self, callback: StaticSubscriber) -> Callable[[], None]:
        """Call C{callback(pair, entry)} after a pair was read anew."""
        return self._subscribers.add(callback)

    def add(self, pair: CertificatePair) -> Deferred[CertificateEntry]:
        """
        Watch C{pair}, reading it now if it is new.

        @return: fires with its entry, or fails with L{CertificateError}
            (the pair stays watched, and is used once the files are fixed).
        """
        watched = self._watched.get(pair)
        if watched is not None and watched.entry is not None:
            return succeed(watched.entry)
        if watched is None:
            watched = self._watched[pair] = _Watched(pair)
        d = self._calls.run(self._read, pair)

        def read(result: tuple[_Signatures, CertificateEntry]) -> CertificateEntry:
            signatures, entry = result
            self._accept(watched, signatures, entry)
            return entry

        def refused(failure: Failure) -> Failure:
            watched.error = failure.getErrorMessage()
            return failure

        return d.addCallbacks(read, refused)

    def discard(self, pair: CertificatePair) -> None:
        """Stop watching C{pair}."""
        self._watched.pop(pair, None)

    def startService(self) -> None:
        """Poll every C{interval} seconds."""
        super().startService()
        self._loop = LoopingCall(self.poll)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: self.log.failure("certificate file polling stopped", f)
        )

    def stopService(self) -> None:
        """Stop polling."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def reload(self) -> Deferred[list[CertificatePair]]:
        """Read every pair again (SIGHUP). @return: fires with the pairs changed."""
        return self._check(force=True)

    def poll(self) -> Deferred[list[CertificatePair]]:
        """Read again the pairs whose files changed. @return: as L{reload}."""
        return self._check(force=False)

    def _check(self, force: bool) -> Deferred[list[CertificatePair]]:
        if self._polling is not None and not force:
            return self._polling  # the previous pass is still reading
        snapshot = [(w, w.seen) for w in self._watched.values()]
        reading = self._calls.run(self._readChanged, snapshot, force)

        def done(results: list[tuple[_Watched, Any, Any]]) -> list[CertificatePair]:
            changed = []
            for watched, signatures, outcome in results:
                if self._watched.get(watched.pair) is not watched:
                    continue  # discarded meanwhile
                if isinstance(outcome, CertificateEntry):
                    if self._accept(watched, signatures, outcome):
                        changed.append(watched.pair)
                else:
                    watched.seen = signatures
                    watched.error = outcome
                    self.log.error(
                        "certificate files {cert}, {key} not reloaded, the old certificate"
                        " is kept: {why}",
                        cert=watched.pair.cert,
                        key=watched.pair.key,
                        why=outcome,
                    )
            return changed

        def finished(result: Any) -> Any:
            self._polling = None
            return result

        d = reading.addCallback(done)
        d.addBoth(finished)
        if not d.called:
            self._polling = d
        return d

    def _readChanged(
        self, snapshot: list[tuple[_Watched, Any]], force: bool
    ) -> list[tuple[_Watched, Any, Any]]:
        """In a thread: stat every pair and read those that changed."""
        results: list[tuple[_Watched, Any, Any]] = []
        for watched, seen in snapshot:
            signatures = (_signature(watched.pair.cert), _signature(watched.pair.key))
            if not force and signatures == seen:
                continue
            try:
                _, entry = self._read(watched.pair)
            except (OSError, CertificateError) as e:
                results.append((watched, signatures, str(e)))
            else:
                results.append((watched, signatures, entry))
        return results

    def _read(
        self, pair: CertificatePair
    ) -> tuple[tuple[Optional[_Signature], Optional[_Signature]], CertificateEntry]:
        """In a thread: read and parse one pair, with the signatures read."""
        signatures = (_signature(pair.cert), _signature(pair.key))
        try:
            chainPEM = files.readFile(pair.cert)
        except OSError as e:
            raise CertificateError(f"{pair.cert}: {e.strerror}") from e
        try:
            keyPEM = files.readFile(pair.key)
        except OSError as e:
            raise CertificateError(f"{pair.key}: {e.strerror}") from e
        entry = buildEntry(keyPEM, chainPEM, f"{pair.cert}, {pair.key}")
        return signatures, entry

    def _accept(self, watched: _Watched, signatures: Any, entry: CertificateEntry) -> bool:
        """Serve C{entry} for C{watched}; C{True} if it is another certificate."""
        old = watched.entry
        watched.seen = signatures
        watched.error = None
        if old is not None and old.fingerprint == entry.fingerprint:
            return False
        watched.entry = entry
        if old is not None:
            self.log.info(
                "certificate {cert} reloaded: {names}, valid until {notAfter}",
                cert=watched.pair.cert,
                names=", ".join(entry.names),
                notAfter=entry.notAfter.isoformat(),
            )
        self._subscribers.notify(watched.pair, entry)
        return True
