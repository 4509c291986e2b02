"""
SOA serials that only increase, and only when a zone changes.

A zone's serial is C{YYYYMMDDnn} (RFC 1912, section 2.2): the first change
of a day starts at C{nn = 00}, later ones count up (past 99 it runs into the
next day's numbers, which is harmless: it only has to grow). Whether a zone
changed is told by a digest of its content, kept with the serial in
C{STATE_DIR/dns-serials.json}, so a restart or a reload that changes nothing
keeps the serial secondaries already have.

The file is small and written rarely (a zone change, an ACME challenge), so
it is written on the reactor thread, to a temporary file then renamed into
place: it is never half written. It is not fsynced: after a crash the
serial may repeat one handed out just before, at worst.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

FILE_NAME = "dns-serials.json"
_MAX_SERIAL = 2**32 - 1


@frozen
class _Entry:
    serial: int
    digest: str


def dateSerial(seconds: float) -> int:
    """C{YYYYMMDD00} of the UTC day holding C{seconds}."""
    day = time.gmtime(seconds)
    return (day.tm_year * 10000 + day.tm_mon * 100 + day.tm_mday) * 100


class SerialStore:
    """
    Serials by zone name, persisted in the state directory (if there is one).

    @ivar path: the file, or C{None} to keep serials in memory only (a
        serial may then repeat across restarts; tests and embedding).
    """

    def __init__(self, path: Optional[str], clock: IReactorTime) -> None:
        self.path = path
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._failed = False
        if path is not None:
            self._entries = self._load(path)

    @classmethod
    def inDirectory(cls, stateDir: Optional[str], clock: IReactorTime) -> SerialStore:
        return cls(None if stateDir is None else os.path.join(stateDir, FILE_NAME), clock)

    def serialFor(self, zone: str, digest: str) -> int:
        """
        The serial of C{zone} whose content hashes to C{digest}: the stored
        one if the content is the same, else a new, greater one (saved).
        """
        entry = self._entries.get(zone)
        if entry is not None and entry.digest == digest:
            return entry.serial
        serial = dateSerial(self.clock.seconds())
        if entry is not None and serial <= entry.serial:
            serial = entry.serial + 1
        if serial > _MAX_SERIAL:
            # RFC 1982 arithmetic would take a wrap; nobody reaches it by
            # date-based serials before the year 42949.
            serial = 1
        self._entries[zone] = _Entry(serial, digest)
        self._save()
        return serial

    def _load(self, path: str) -> dict[str, _Entry]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.error("DNS serials: cannot read {path} ({error}); starting afresh",
                      path=path, error=e)
            return {}
        entries = {}
        if isinstance(data, dict):
            for zone, item in data.items():
                if (
                    isinstance(item, dict)
                    and isinstance(item.get("serial"), int)
                    and isinstance(item.get("digest"), str)
                ):
                    entries[str(zone)] = _Entry(item["serial"], item["digest"])
        return entries

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            zone: {"serial": entry.serial, "digest": entry.digest}
            for zone, entry in sorted(self._entries.items())
        }
        temporary = f"{self.path}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(temporary, self.path)
            self._failed = False
        except OSError as e:
            if not self._failed:
                log.error("DNS serials: cannot write {path} ({error}); serials kept in memory",
                          path=self.path, error=e)
            self._failed = True
