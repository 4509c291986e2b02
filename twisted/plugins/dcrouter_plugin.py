"""
twistd's entry to dcrouter: C{twistd dcrouter --config FILE}.

Thin on purpose: importing this module (which twistd does for every
command) must not import dcrouter itself, nor anything that installs a
reactor. L{_RouterMaker} imports L{dcrouter.tap} only when dcrouter runs,
and first installs dcrouter's reactor unless one was chosen.
"""

import sys

from twisted.application.service import ServiceMaker
from twisted.python.runtime import platform
from twisted.python.usage import Options


class _RouterMaker(ServiceMaker):
    """
    Twisted's L{ServiceMaker}, which installs dcrouter's reactor (that of
    L{dcrouter.workers.reactor}) as twistd asks for C{dcrouter}'s options,
    on Linux, unless a reactor is installed already.

    twistd (22.4 to now) installs the reactor of C{--reactor NAME} as it
    parses its own options, which come before C{dcrouter}; otherwise its
    default one at the first C{from twisted.internet import reactor}, and
    importing L{dcrouter.tap} is that first (through C{twisted.mail.smtp}).
    So when this property is read a reactor is installed only if the user
    chose one (or something else imported it: it is left as it is), and
    none means that this is the last moment to install another.
    """

    @property
    def options(self) -> type[Options]:
        from dcrouter.ops.systemd import holdHangups

        # Until the router reloads on SIGHUP, one is held, not fatal.
        holdHangups()
        if platform.isLinux() and "twisted.internet.reactor" not in sys.modules:
            from dcrouter.workers.reactor import install

            install()
        return super().options


dcrouter = _RouterMaker(
    "dcrouter",
    "dcrouter.tap",
    "An edge router: L4/L7 routes, TLS, and more, from one INI file.",
    "dcrouter",
)
