"""
twistd's entry to dcrouter: C{twistd dcrouter --config FILE}.

Thin on purpose: importing this module (which twistd does for every
command) must not import dcrouter itself, nor anything that installs a
reactor. L{ServiceMaker} imports L{dcrouter.tap} only when dcrouter runs.
"""

from twisted.application.service import ServiceMaker

dcrouter = ServiceMaker(
    "dcrouter",
    "dcrouter.tap",
    "An edge router: L4/L7 routes, TLS, and more, from one INI file.",
    "dcrouter",
)
