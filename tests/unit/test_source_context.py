"""What a source sees of the router (router.app's SourceContext) against a real store."""

from __future__ import annotations

import pytest

from router.app import _SourceContext


@pytest.mark.parametrize("status, active", [("running", 1), ("retrying", 1), ("failed", 0), ("success", 0)])
async def test_active_executions_counts_runs_waiting_for_a_retry(make_headwater, status, active):
    # Regression: overlap=forbid asked for `running` executions only, so a run waiting for its retry
    # (status retrying) did not stop the next cron tick from starting another.
    hw = await make_headwater("null")
    await hw.store.executions.add(function_id="f", function_version=0, status=status, sync=False, input=None,
                                  project_id="default", subscription_id="sub-1", event_id="tick-1", attempts=1)
    await hw.store.executions.add(function_id="f", function_version=0, status="running", sync=False, input=None,
                                  project_id="default", subscription_id="other", event_id="tick-1", attempts=1)
    assert await _SourceContext(hw, "cron").active_executions("sub-1") == active
