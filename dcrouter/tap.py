"""
twistd's options and service maker: C{twistd dcrouter --config FILE}.

The configuration is checked while the options are parsed, before twistd
daemonizes or binds anything: a bad file prints every error, one per line,
and exits with status 1, on every Twisted from 22.4 on.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from dcrouter.config.errors import ConfigErrors
from dcrouter.config.model import RouterConfig
from dcrouter.service import DcRouter, ProcessRole, checkConfigFile


class Options(usage.Options):
    """C{twistd dcrouter} options."""

    synopsis = "--config FILE"
    optParameters = [
        ["config", "c", None, "The configuration file, e.g. /etc/dcrouter.ini."],
    ]

    routerConfig: Optional[RouterConfig] = None

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        self["config"] = os.path.abspath(self["config"])
        try:
            self.routerConfig = checkConfigFile(self["config"]).config
        except ConfigErrors as e:
            print(f"dcrouter: {len(e.errors)} error(s) in the configuration:", file=sys.stderr)
            print(e.report(), file=sys.stderr)
            raise SystemExit(1) from None


class _JsonLogging(MultiService):
    """
    Asks twistd to log JSON lines to standard output.

    twistd uses the L{ILogObserver} component of its application when one is
    set, as documented for .tac files; a plugin reaches the application only
    when its service is attached to it, so this is done here.
    """

    def setServiceParent(self, parent: object) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(
                ILogObserver, jsonFileLogObserver(sys.stdout, recordSeparator="")
            )
        super().setServiceParent(parent)


def makeService(options: Options) -> IService:
    config = options.routerConfig
    assert config is not None
    role = ProcessRole.forWorkers(config.daemon.workerCount())
    router = DcRouter(config, configPath=options["config"], role=role)
    if config.daemon.log_format != "json":
        return router
    root = _JsonLogging()
    router.setServiceParent(root)
    return root
