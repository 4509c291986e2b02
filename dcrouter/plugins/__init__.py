"""
The plugin package that C{getPlugins(IRouteAction, dcrouter.plugins)} reads.

Third-party distributions install modules into a C{dcrouter/plugins/}
directory of their own (with no C{__init__.py}); C{pluginPackagePaths} makes
every such directory on C{sys.path} part of this package.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
