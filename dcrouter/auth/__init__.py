"""Credential checkers shared by HTTP auth and SMTP AUTH."""
