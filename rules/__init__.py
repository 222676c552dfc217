"""Shipped detection rules (YAML). Installed as the package rome_guard.rules."""
