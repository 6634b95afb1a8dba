"""The Headwater Python 3 runtime's modules (stdlib only; never imports Headwater itself)."""
