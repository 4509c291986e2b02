"""The built-in route actions; each is published as a plugin in L{dcrouter.plugins}."""
