"""
Installs dcrouter and its twistd plugin.

The plugin lives in C{twisted/plugins/} with no C{__init__.py} (Twisted's
convention), so it is listed here by hand: setuptools' package finder cannot
see a directory that is not a package.
"""

from setuptools import setup

setup(
    packages=["dcrouter", *(f"dcrouter.{sub}" for sub in (
        "config", "net", "proxy", "http", "auth", "certs", "actions", "plugins", "ops", "dns",
        "mail", "workers",
    )), "twisted.plugins"],
    package_data={"twisted.plugins": ["dcrouter_plugin.py"]},
)
