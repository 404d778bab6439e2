"""The scheduler: resource pools per host from metadata, and the server's placement events."""
