"""The operator's web dashboard at /dashboard: static pages, a live event tail and per-minute counts."""
