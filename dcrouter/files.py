"""
Durable file writes for the state directory (certificates, keys, ACME's
shared answers): blocking, for the thread pool or start-up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

#: Prefix of the temporary files L{writeAtomically} makes; a crash can leave
#: one behind, which L{removeTemporaries} clears.
TEMPORARY_PREFIX = ".tmp-"


def ensureDirectory(path: str, mode: int = 0o700) -> None:
    """Create C{path} (and its parents) if missing, the last one with C{mode}."""
    os.makedirs(path, mode=mode, exist_ok=True)


def fsyncDirectory(path: str) -> None:
    """Make a rename or unlink in C{path} durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writeAtomically(path: str, data: bytes, mode: int) -> None:
    """
    Replace C{path} with C{data}: readers see the old file or the new one,
    whole, and after a crash one of them is there.

    The data goes to a temporary file in the same directory, created with
    C{mode} (so a key is never readable by others, not even briefly), is
    fsynced, renamed over C{path}, and the directory is fsynced.
    """
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=TEMPORARY_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsyncDirectory(directory)


def removeDurably(path: str) -> bool:
    """Unlink C{path} and fsync its directory; C{False} if it was not there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsyncDirectory(os.path.dirname(path) or ".")
    return True


def removeTemporaries(directory: str) -> list[str]:
    """Delete what an interrupted L{writeAtomically} left in C{directory}."""
    removed = []
    for name in os.listdir(directory):
        if name.startswith(TEMPORARY_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def readFile(path: str) -> bytes:
    """The whole content of C{path}."""
    with open(path, "rb") as f:
        return f.read()
