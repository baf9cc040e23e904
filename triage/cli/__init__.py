"""Command lines: `triage` (the daemon and its tools) and `triage-admin` (operations)."""
