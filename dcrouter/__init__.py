"""dcrouter: one Twisted daemon that gates a datacenter's traffic through one route table."""

__version__ = "0.1.0"
