"""Garbage-collector settings for a long-running server process."""

from __future__ import annotations

import gc

# The youngest generation is collected after this many net allocations (CPython's default is
# 700). Routing an event allocates a few hundred short-lived objects, nearly none of them in
# reference cycles; at 700 the collector runs every few events.
YOUNG_THRESHOLD = 10_000


def tune_for_server() -> None:
    """Call once start-up is done. Moves what start-up allocated (modules, ORM mappings, config:
    hundreds of thousands of objects that live as long as the process) out of the collector's
    sight, so the periodic full collections no longer walk it all, and collects the young
    generation less often. Measured on the routed NATS path: about 20 % less CPU per event."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
