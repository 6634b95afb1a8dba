"""etc/grafana/headwater.json: valid JSON, and every metric its panels query is one Headwater exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from router.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "etc" / "grafana" / "headwater.json"


def _exported() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_every_panel_queries_metrics_headwater_exports():
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in doc["panels"] for t in panel["targets"]]
    assert exprs and all(panel.get("description") for panel in doc["panels"])
    used = {name for expr in exprs for name in re.findall(r"\bheadwater_[a-z_]+", expr)}
    assert used - _exported() == set()
    # Every series the dashboard's overview promises is on it.
    for metric in ("headwater_events_in_total", "headwater_events_routed_total", "headwater_executions_failed_total",
                   "headwater_dead_letters_total", "headwater_route_latency_seconds_bucket"):
        assert metric in used
