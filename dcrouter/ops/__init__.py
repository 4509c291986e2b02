"""What operators see and run it with: logs, metrics, the admin site, systemd's readiness."""
