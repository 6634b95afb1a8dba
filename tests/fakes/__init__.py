"""Faithful in-process stand-ins for servers that cannot run on the test machines (Kubernetes)."""
