"""
The files and folders the configuration names, checked as the daemon will
use them: a secret file every user of the machine can read (a warning), a
state directory this user cannot make or write.

Only the "others" read bit counts for a secret: a key readable by its
group is the Debian way (C{root:ssl-cert}, mode 0640), and the daemon's
user often reads keys through such a group. A warning, not an error, so
that an upgrade never stops a router that ran before; OpenSSH refuses such
a key outright.
"""

from __future__ import annotations

import os
import stat
from typing import Optional


def exposedSecret(path: str) -> Optional[str]:
    """
    What to tell the operator if every user can read C{path}; C{None} if
    not, or if it cannot be examined (reading it reports that).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if not mode & stat.S_IROTH:
        return None
    return (
        f"{path} holds a secret and every user can read it "
        f"(mode {stat.S_IMODE(mode):04o}); chmod o-r {path}"
    )


def unwritableDirectory(path: str) -> Optional[str]:
    """
    Why this user cannot use C{path} as a directory to write in, making it
    (and its parents) if missing; C{None} if it can.
    """
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
