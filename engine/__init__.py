"""Execution engines (local runtime processes, Kubernetes) and function package storage."""
