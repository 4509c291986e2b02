"""Certificates: the store, the ACME issuing service and the challenge responders."""
