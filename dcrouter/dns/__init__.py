"""The authoritative DNS server: zones, hardened twisted.names protocols, ACME/DKIM records."""
