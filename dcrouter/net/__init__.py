"""
What every server here stands on, whatever it speaks: lean TCP transports,
TLS wrapping and policy, the PROXY protocol, the client gate (allow/block
lists, caps, rates), batched sending and the idle sweep.

The L4 router (C{proxy/}), the HTTP proxy (C{http/}) and the mail server
(C{mail/}) all build on it; it imports none of them.
"""
