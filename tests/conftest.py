"""Shared pytest fixtures. Each fixtures_*.py module owns one part of the rig."""

pytest_plugins = ["fixtures_infra", "fixtures_zoo"]
