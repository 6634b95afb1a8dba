"""Headwater's core: the event type, plugin contracts, configuration, store, bus, routing and API."""

__version__ = "0.1.0"
