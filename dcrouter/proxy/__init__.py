"""The L4 router: listeners, ClientHello parsing, route table, target pools, forwarding."""
