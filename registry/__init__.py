"""loraplex adapter registry."""
