"""etc-host-updater: one line per Rancher host in this container's hosts file, from metadata."""
