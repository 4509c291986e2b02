"""
Files that hold secrets (private keys, passwords, TSIG and HMAC keys): a
warning when every user of the machine can read one.

Only the "others" read bit counts: a key readable by its group is the
Debian way (C{root:ssl-cert}, mode 0640), and the daemon's user often reads
keys through such a group. A warning, not an error, so that an upgrade
never stops a router that ran before; OpenSSH refuses such a key outright.
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
