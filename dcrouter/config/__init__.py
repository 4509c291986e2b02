"""
Configuration: the typed, frozen model and its INI front end.

Build a L{RouterConfig} from Python, or read one with L{loadConfig}; either
way a bad configuration raises L{ConfigErrors} carrying every error found.
"""

from dcrouter.config.errors import ConfigError, ConfigErrors
from dcrouter.config.ini import loadConfig, parseConfig
from dcrouter.config.model import (
    PYTHON,
    TLS_MODES,
    CertificatePair,
    DaemonSettings,
    Defaults,
    HostPort,
    IPNetwork,
    Limits,
    LogFormat,
    RawValue,
    RouteConfig,
    RouterConfig,
    Source,
    TlsMode,
    TlsSettings,
)

__all__ = [
    "PYTHON",
    "TLS_MODES",
    "CertificatePair",
    "ConfigError",
    "ConfigErrors",
    "DaemonSettings",
    "Defaults",
    "HostPort",
    "IPNetwork",
    "Limits",
    "LogFormat",
    "RawValue",
    "RouteConfig",
    "RouterConfig",
    "Source",
    "TlsMode",
    "TlsSettings",
    "loadConfig",
    "parseConfig",
]
