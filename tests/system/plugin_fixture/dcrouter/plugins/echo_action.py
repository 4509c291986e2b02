"""
A test-only route action, C{action = echo}: greets, then echoes.

This directory is laid out as docs/plugins.md tells a plugin author:
C{dcrouter/plugins/} with no C{__init__.py} in it nor in C{dcrouter/}, found
through C{pluginPackagePaths} once C{plugin_fixture} is on C{sys.path}
(tests/system/test_plugins.py puts it on PYTHONPATH). dcrouter's own code
does not know it.
"""

from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from zope.interface import implementer

from dcrouter.interfaces import IRouteAction


class Echo(Protocol):
    def __init__(self, connection, greeting):
        self.connection = connection
        self.greeting = greeting

    def connectionMade(self):
        self.connection.record.target = "echo"
        self.connection.record.bytesOut += len(self.greeting)
        self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.connection.record.bytesIn += len(data)
        self.connection.record.bytesOut += len(data)
        self.transport.write(data)


@implementer(IPlugin, IRouteAction)
class EchoAction:
    name = "echo"

    def parseOptions(self, options):
        return options.text("greeting", "hello").encode() + b"\n"

    def buildProtocol(self, connection, greeting):
        return Echo(connection, greeting)


echo = EchoAction()
