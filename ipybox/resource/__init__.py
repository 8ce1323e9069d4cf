"""Host-side access to a container's resource server (container port 8900)."""
