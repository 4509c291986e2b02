"""
twistd's options and service maker: C{twistd dcrouter --config FILE}.

The configuration is checked while the options are parsed, before twistd
daemonizes or binds anything: a bad file prints every error, one per line,
and exits with status 1, on every Twisted from 22.4 on.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Optional

from twisted.application.service import IService, MultiService
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from dcrouter.compile import checkConfigFile
from dcrouter.config.errors import ConfigErrors
from dcrouter.config.model import RouterConfig
from dcrouter.files import ensureDirectory
from dcrouter.ops.logwriter import logObserver, turnWriter
from dcrouter.service import DcRouter, ProcessRole


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


class _Logging(MultiService):
    """
    Gives twistd the log observer to use.

    twistd uses the L{ILogObserver} component of its application when one is
    set, as documented for .tac files; a plugin reaches the application only
    when its service is attached to it, so this is done here.
    """

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: object) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def textToStandardOutput(twistdOptions: Optional[usage.Options]) -> bool:
    """
    Would twistd log text to standard output (C{--nodaemon} without
    C{--syslog}, C{--logger} or a C{--logfile} other than C{-})?
    """
    if twistdOptions is None:
        return False
    if twistdOptions.get("syslog") or twistdOptions.get("logger"):
        return False
    return bool(twistdOptions.get("nodaemon")) and twistdOptions.get("logfile") in (None, "-")


def _turnWriter() -> IO[str]:
    """Standard output, written once per turn of the reactor twistd installed."""
    from twisted.internet import reactor

    return turnWriter(sys.stdout, reactor)


def makeService(options: Options) -> IService:
    config = options.routerConfig
    assert config is not None
    try:
        ensureDirectory(config.daemon.state_dir)
    except OSError as e:
        # One line, not the traceback of whichever part wrote there first.
        raise SystemExit(
            f"dcrouter: cannot start: state_dir {config.daemon.state_dir}: {e.strerror}"
        ) from None
    role = ProcessRole.forWorkers(config.daemon.workerCount())
    router = DcRouter(config, configPath=options["config"], role=role)
    logFormat = config.daemon.log_format
    # Text elsewhere than standard output is twistd's own; else the same
    # lines or records as Twisted's observers write, made faster.
    if logFormat != "json" and not textToStandardOutput(getattr(options, "parent", None)):
        return router
    root = _Logging(logObserver(logFormat, _turnWriter()))
    router.setServiceParent(root)
    return root
