"""Result source: the results of executions, put back on the bus by subscriptions with an `event`
sink, so one function's result can trigger the next (`source: result` subscriptions)."""

from __future__ import annotations

import datetime as _dt
from typing import Any, ClassVar

from router.config import Config
from router.plugins import SourceContext, SubscriptionInvalid

# The shape of a result event (built by the router, router.results):
#   type     org.openstack.headwater.execution.<success|failed|error>
#   source   /headwater/executions/<execution id>
#   subject  the id of the subscription whose execution produced it
#   data     {execution_id, subscription_id, function_id, status, output, duration, event_id}
#   chaindepth  how many results deep the chain is (the router stops it past [events] max_chain_depth)


class ResultSource:
    kind: ClassVar[str] = "result"

    def __init__(self, config: Config):
        self.config = config

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        for field in ("pattern", "first_execution_time", "count"):
            if params.get(field) is not None:
                raise SubscriptionInvalid(f"{field} is a cron option; result subscriptions take types and filters.")
        return {}

    async def start(self, ctx: SourceContext) -> None:
        """Nothing to run: the router publishes result events itself."""

    async def stop(self) -> None:
        pass
