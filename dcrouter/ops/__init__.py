"""What operators see: the access log (and, later, metrics and the status page)."""
