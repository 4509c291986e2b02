"""Listeners, ClientHello parsing, the route table, the gate, TLS and byte forwarding."""
