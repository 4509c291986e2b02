"""HTTP/1.1 reverse proxy: wire format, server side, backend pool, L7 actions."""
