"""
Configuration errors, collected rather than raised one at a time.

Every error names where it is (file:line), the section, the key and what is
wrong, in one line an operator can act on::

    dcrouter.ini:14: [route:web] ports: 'eighty' is not a port or range
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Optional

from attrs import frozen

from dcrouter.config.model import PYTHON, Source


@frozen
class ConfigError:
    """One thing wrong with the configuration."""

    message: str
    source: Source = PYTHON
    section: Optional[str] = None
    key: Optional[str] = None

    def __str__(self) -> str:
        where = f"[{self.section}] " if self.section else ""
        what = f"{self.key}: " if self.key else ""
        return f"{self.source}: {where}{what}{self.message}"


class ConfigErrors(Exception):
    """
    Raised once, at the end of loading, carrying every error found.

    @ivar partial: what the loader made of the file despite the errors (bad
        values replaced by defaults), so that the floor above can still
        check the rest and report its errors in the same run; or C{None}.
    """

    def __init__(self, errors: Iterable[ConfigError], partial: Optional[object] = None) -> None:
        self.errors = sorted(errors, key=lambda e: (e.source.file, e.source.line))
        self.partial = partial
        super().__init__(self.report())

    def report(self) -> str:
        """All errors, one per line, in file order."""
        return "\n".join(str(error) for error in self.errors)


_INLINE_COMMENT = re.compile(r"\s[#;]")


def withCommentHint(message: str, text: str) -> str:
    """
    C{message} about a value that did not parse, with a hint if C{text}
    holds what looks like a comment after it (C{80 # http}): comments go
    on lines of their own, as the file's grammar has it.
    """
    if _INLINE_COMMENT.search(text):
        return (
            f"{message} (a comment goes on a line of its own: # or ; after a value is part of it)"
        )
    return message


def firstOfEach(warnings: Iterable[ConfigError]) -> tuple[ConfigError, ...]:
    """
    C{warnings} in file order, each message once: a secret file that
    several sections name is warned of where it comes first.
    """
    first: dict[str, ConfigError] = {}
    for warning in sorted(warnings, key=lambda w: (w.source.file, w.source.line)):
        first.setdefault(warning.message, warning)
    return tuple(first.values())


class ErrorCollector:
    """
    Gathers errors while a configuration is read; raises them all at once.

    @ivar warnings: what is allowed but risky (a private key every user can
        read): C{checkconfig} prints them, the daemon logs them; they stop
        nothing.
    """

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigError] = []

    def add(
        self,
        message: str,
        source: Source = PYTHON,
        section: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        self.errors.append(ConfigError(message, source, section, key))

    def warn(
        self,
        message: str,
        source: Source = PYTHON,
        section: Optional[str] = None,
        key: Optional[str] = None,
    ) -> None:
        self.warnings.append(ConfigError(message, source, section, key))

    def extend(self, errors: Iterable[ConfigError]) -> None:
        self.errors.extend(errors)

    def raiseIfAny(self, partial: Optional[object] = None) -> None:
        if self.errors:
            raise ConfigErrors(self.errors, partial)
