"""The cron source: validates schedules (Qinling jobs) and publishes one tick event per scheduled time."""

from __future__ import annotations

import asyncio
import hashlib
import datetime as _dt
import logging
from collections.abc import Callable
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from router.config import Config
from router.events import Event, derived_id
from router.plugins import SourceContext, Subscription, SubscriptionInvalid

log = logging.getLogger(__name__)

KIND = "cron"
EVENT_TYPE = "org.openstack.headwater.cron.tick"
DEFAULT_TIMEZONE = "UTC"

# Qinling refuses a first execution closer than this, so a job can never be created already late.
MIN_LEAD = _dt.timedelta(seconds=60)
# Qinling starts the cron search one minute before first_execution_time, so a match at exactly that
# time is the first run (croniter only returns matches strictly after its start).
FIRST_RUN_BACKOFF = _dt.timedelta(minutes=1)

Clock = Callable[[], _dt.datetime]

# Pattern convention: 5 fields (minute hour day month weekday) as in crontab, or 6 fields whose FIRST
# field is seconds (`*/10 * * * * *` = every ten seconds; croniter's second_at_beginning), as in
# Quartz/Spring and most schedulers people copy from; or one croniter alias such as `@daily`.
_PLAIN_FIELDS = 5
_SECONDS_FIELDS = 6


def _utc(value: _dt.datetime) -> _dt.datetime:
    """Aware UTC; a naive datetime is taken to be UTC already (what the store and Qinling assume)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=_dt.timezone.utc)
    return value.astimezone(_dt.timezone.utc)


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown timezone {name!r}") from exc


def _seconds_first(pattern: str) -> bool:
    fields = pattern.split()
    if len(fields) == 1 and fields[0].startswith("@"):
        return False
    if len(fields) not in (_PLAIN_FIELDS, _SECONDS_FIELDS):
        # croniter would read 6 fields as trailing seconds and 7 as seconds + year; refusing other
        # shapes keeps one convention, so a pattern means the same thing everywhere.
        raise ValueError(f"a cron pattern has {_PLAIN_FIELDS} fields, or {_SECONDS_FIELDS} with seconds first")
    return len(fields) == _SECONDS_FIELDS


def next_fire_time(pattern: str, after: _dt.datetime, timezone: str = DEFAULT_TIMEZONE) -> _dt.datetime:
    """The first match of `pattern` strictly after `after`, with the pattern read on the wall clock of
    the IANA zone `timezone`; returned as an aware UTC datetime. Raises ValueError for a bad pattern or
    zone, or when the pattern never matches again (e.g. `0 0 30 2 *`)."""
    if not isinstance(pattern, str):
        raise ValueError("a cron pattern is a string")
    zone = _zone(timezone)
    seconds_first = _seconds_first(pattern)
    # croniter walks an aware start in its own zone: in spring a wall time that does not exist
    # (02:30 on the night clocks jump 02:00 → 03:00) fires at the first instant after the gap, so
    # nothing is skipped. In autumn the hour 02:00–03:00 happens twice and croniter fires a daily
    # 02:30 job twice; a job pinned to an hour must run once, as in Vixie cron. Jobs whose hour
    # field is a wildcard (every 20 minutes) keep firing through both hours: those are real instants.
    fixed_hour = _fixed_hour(pattern, seconds_first)
    iterator = croniter(pattern.strip(), _utc(after).astimezone(zone), second_at_beginning=seconds_first)
    for _ in range(4):
        match = iterator.get_next(_dt.datetime)
        local = match.astimezone(zone)
        if fixed_hour and local.fold == 1 and _is_ambiguous(local):
            continue  # the second occurrence of a repeated wall-clock time
        return _utc(match)
    raise ValueError(f"no next time for {pattern!r} in {timezone}")


def _fixed_hour(pattern: str, seconds_first: bool) -> bool:
    fields = pattern.split()
    if len(fields) == 1:  # @daily, @weekly, …: pinned to midnight; @hourly is the exception
        return fields[0] not in ("@hourly",)
    hour = fields[2 if seconds_first else 1]
    return "*" not in hour


def _is_ambiguous(local: _dt.datetime) -> bool:
    """True when this wall-clock time happens twice in its zone (the autumn DST fold)."""
    return local.replace(fold=0).utcoffset() != local.replace(fold=1).utcoffset()


def _parse_time(value: Any) -> _dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, _dt.datetime):
        return _utc(value)
    if isinstance(value, str):
        try:
            return _utc(_dt.datetime.fromisoformat(value.strip()))
        except ValueError:
            pass
    raise SubscriptionInvalid(f"Invalid first_execution_time: {value}")


def _subscription_timezone(sub: Subscription) -> str:
    # The subscription view has no column of its own for the zone; the router keeps it in options.
    return getattr(sub, "timezone", None) or (sub.options or {}).get("timezone") or DEFAULT_TIMEZONE


CATCHUP_POLICIES = ("all", "one", "skip")
OVERLAP_POLICIES = ("allow", "forbid", "replace")
REPLACED = "replaced"  # the recorded reason of a run that overlap=replace cancelled
DEFAULT_CATCHUP_LIMIT = 100
MAX_JITTER_SECONDS = 3600


def _policies(params: dict[str, Any]) -> dict[str, Any]:
    """The scheduling policies of a cron subscription, from its top-level fields or `options`:
    catchup (all|one|skip, after downtime), catchup_limit (the most missed ticks `all` replays),
    overlap (allow; forbid: skip a tick while the previous run still runs; replace: cancel the
    previous run and run the new tick), jitter (seconds)."""
    options = params.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise SubscriptionInvalid("options must be an object.")
    merged = {k: params[k] if params.get(k) is not None else options.get(k)
              for k in ("catchup", "catchup_limit", "overlap", "jitter")}
    out: dict[str, Any] = {}
    if merged["catchup"] is not None:
        if merged["catchup"] not in CATCHUP_POLICIES:
            raise SubscriptionInvalid(f"catchup must be one of {', '.join(CATCHUP_POLICIES)}, not {merged['catchup']!r}.")
        out["catchup"] = merged["catchup"]
    if merged["catchup_limit"] is not None:
        limit = merged["catchup_limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise SubscriptionInvalid("catchup_limit must be an integer from 1 to 10000.")
        out["catchup_limit"] = limit
    if merged["overlap"] is not None:
        if merged["overlap"] not in OVERLAP_POLICIES:
            raise SubscriptionInvalid(f"overlap must be one of {', '.join(OVERLAP_POLICIES)}, not {merged['overlap']!r}.")
        out["overlap"] = merged["overlap"]
    if merged["jitter"] is not None:
        jitter = merged["jitter"]
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0 <= jitter <= MAX_JITTER_SECONDS:
            raise SubscriptionInvalid(f"jitter must be a number of seconds from 0 to {MAX_JITTER_SECONDS}.")
        out["jitter"] = jitter
    return out


def _jitter(sub: Subscription, scheduled: _dt.datetime) -> _dt.timedelta:
    """A stable delay in [0, jitter): the same for a tick on every replica, spread across schedules."""
    jitter = float((sub.options or {}).get("jitter") or 0)
    if not jitter:
        return _dt.timedelta(0)
    digest = hashlib.sha256(f"{sub.id}|{scheduled.isoformat()}".encode()).digest()
    return _dt.timedelta(seconds=int.from_bytes(digest[:8], "big") / 2**64 * jitter)


class CronSource:
    """Schedules as subscriptions: Qinling's job validation, and a scheduler loop that publishes a tick
    with a deterministic id for each due schedule and asks the router to move the schedule on."""

    kind: ClassVar[str] = KIND

    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        self._clock: Clock = clock or (lambda: _dt.datetime.now(_dt.timezone.utc))
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # subscription id → the last tick this replica saw moved on (advanced here or by another
        # replica). The snapshot from ctx.subscriptions may lag the store for a moment; this keeps a
        # lagging view from publishing the same tick again.
        self._moved_past: dict[str, _dt.datetime] = {}

    def _now(self) -> _dt.datetime:
        return _utc(self._clock())

    # -----------------------------------------------------------------------------------------
    # Validation

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        """Qinling's job rules (validate_job): pattern and/or first_execution_time, the first run at
        least a minute ahead, one-shot jobs run once. Returns params with `pattern`,
        `first_execution_time`, `next_execution_time` (aware UTC), `count` and `timezone` normalised."""
        now = _utc(now)
        pattern = params.get("pattern")
        if isinstance(pattern, str):
            pattern = pattern.strip() or None
        first_time = _parse_time(params.get("first_execution_time"))
        count = params.get("count")
        tz_name = params.get("timezone") or DEFAULT_TIMEZONE

        if not (pattern or first_time):
            raise SubscriptionInvalid("pattern or first_execution_time must be specified.")
        # bool is an int subclass; `count: true` is a client mistake, not a count of 1.
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise SubscriptionInvalid("count must be a positive integer.")
        try:
            _zone(tz_name)
        except ValueError:
            raise SubscriptionInvalid(f"Unknown timezone: {tz_name}") from None

        next_time = first_time
        if first_time is not None:
            if first_time < now + MIN_LEAD:
                raise SubscriptionInvalid("Execution time must be at least 1 minute in the future.")
            if not pattern and count is not None and count > 1:
                raise SubscriptionInvalid("pattern must be provided if count is greater than 1.")
            if not pattern and count is None:
                count = 1
        if pattern:
            if not isinstance(pattern, str):
                raise SubscriptionInvalid(f"The specified pattern is not valid: {pattern}")
            start = first_time - FIRST_RUN_BACKOFF if first_time is not None else now
            try:
                # Computing the first match also rejects patterns croniter parses but that never
                # match (31 February): a schedule that can never fire is a mistake worth a 400.
                next_time = next_fire_time(pattern, start, tz_name)
            except (ValueError, KeyError, TypeError, OverflowError):
                raise SubscriptionInvalid(f"The specified pattern is not valid: {pattern}") from None
            first_time = next_time

        return {
            **params,
            "pattern": pattern,
            "first_execution_time": first_time,
            "next_execution_time": next_time,
            "count": count,
            "timezone": tz_name,
            "options": _policies(params),
        }

    # -----------------------------------------------------------------------------------------
    # Scheduler

    async def start(self, ctx: SourceContext) -> None:
        """Start the scheduler task and return; stop() ends it."""
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        ctx.on_subscriptions_changed(self._subscriptions_changed)
        self._task = asyncio.create_task(self._run(ctx), name="headwater-cron-scheduler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self._moved_past.clear()

    def _subscriptions_changed(self) -> None:
        # The router may call this from another thread, and after stop() (it has no unregister).
        loop, wake = self._loop, self._wake
        if self._task is None or loop is None or wake is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass

    async def _run(self, ctx: SourceContext) -> None:
        assert self._wake is not None
        max_sleep = float(self.config.cron.max_sleep)
        while True:
            # Cleared before reading the table, so a change made while this pass runs wakes the next.
            self._wake.clear()
            try:
                earliest = await self._pass(ctx)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cron scheduler pass failed; retrying")
                earliest = None
            delay = max_sleep
            if earliest is not None:
                delay = min(max_sleep, max(0.0, (earliest - self._now()).total_seconds()))
            if delay <= 0:
                # Missed ticks are due at once; yield so one busy schedule cannot starve the loop.
                await asyncio.sleep(0)
                continue
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _pass(self, ctx: SourceContext) -> _dt.datetime | None:
        """Fire every due schedule once (its current tick; later missed ticks come on later passes).
        Returns the earliest next time among schedules still to fire, for the sleep."""
        subscriptions = list(ctx.subscriptions(KIND))
        now = self._now()
        live = {sub.id for sub in subscriptions}
        for sub_id in list(self._moved_past):
            if sub_id not in live:
                del self._moved_past[sub_id]

        due: list[tuple[_dt.datetime, Subscription]] = []
        waiting: list[_dt.datetime] = []
        for sub in subscriptions:
            if sub.status != "running" or sub.next_execution_time is None:
                continue
            scheduled = _utc(sub.next_execution_time)
            moved = self._moved_past.get(sub.id)
            if moved is not None and scheduled <= moved:
                # A lagging snapshot; the change notification (or max_sleep) brings the fresh row.
                continue
            fire_at = scheduled + _jitter(sub, scheduled)
            if fire_at <= now:
                due.append((scheduled, sub))
            else:
                waiting.append(fire_at)

        due.sort(key=lambda item: (item[0], item[1].id))
        for scheduled, sub in due:
            skipped_to = await self._catch_up(ctx, sub, scheduled, now)
            if skipped_to is not None:
                waiting.append(skipped_to)
                continue
            if (sub.options or {}).get("overlap") == "forbid" and await ctx.active_executions(sub.id):
                # The previous run still runs: this tick is skipped, not queued.
                log.info("cron tick skipped: previous run still running (overlap=forbid)",
                         extra={"subscription_id": sub.id, "scheduled": scheduled.isoformat()})
                moved_on = await self._advance(ctx, sub, scheduled, fired=False)
                if moved_on is not None:
                    waiting.append(moved_on)
                continue
            moved_on = await self._fire(ctx, sub, scheduled)
            if moved_on is not None:
                # The next tick may already be due (after downtime): zero sleep, next pass fires it.
                waiting.append(moved_on)
            # A failed tick is left out of `waiting`: it is retried after max_sleep, not in a hot loop.
        return min(waiting, default=None)

    async def _catch_up(self, ctx: SourceContext, sub: Subscription, scheduled: _dt.datetime,
                        now: _dt.datetime) -> _dt.datetime | None:
        """Apply the catch-up policy to a schedule that has fallen behind (downtime): move it on
        without firing the ticks the policy drops. Returns the new next time, or None to fire
        `scheduled` as usual."""
        if not sub.pattern:
            return None
        options = sub.options or {}
        policy = options.get("catchup", "all")
        limit = int(options.get("catchup_limit", DEFAULT_CATCHUP_LIMIT))
        timezone = _subscription_timezone(sub)
        # The due ticks from `scheduled` up to now, counting at most limit + 1 of them.
        due = [scheduled]
        try:
            while len(due) <= limit:
                following = next_fire_time(sub.pattern, due[-1], timezone)
                if following > now:
                    break
                due.append(following)
        except (ValueError, KeyError, TypeError, OverflowError):
            return None
        missed = len(due) - 1  # ticks already superseded by a later due tick
        if policy == "all" and missed < limit:
            return None
        if policy == "skip":
            keep = None  # none of the overdue ticks fires; the next future one will
        elif policy == "one":
            keep = due[-1]  # only the latest overdue tick fires
        else:
            keep = due[-limit]  # `all`, bounded: drop the oldest beyond the limit
        if keep == scheduled:
            return None
        try:
            target = keep if keep is not None else next_fire_time(sub.pattern, due[-1], timezone)
        except (ValueError, KeyError, TypeError, OverflowError):
            return None
        log.info("cron catch-up: moving past missed ticks", extra={
            "subscription_id": sub.id, "policy": policy, "from": scheduled.isoformat(), "to": target.isoformat()})
        return await self._advance(ctx, sub, scheduled, target, fired=False)

    async def _advance(self, ctx: SourceContext, sub: Subscription, scheduled: _dt.datetime,
                       target: _dt.datetime | None = None, *, fired: bool) -> _dt.datetime | None:
        """Move a schedule past `scheduled` without firing it, to `target` (default: the next tick).
        Returns the new next time; None if the schedule is done or the advance must be retried."""
        try:
            if target is None and sub.pattern:
                target = next_fire_time(sub.pattern, scheduled, _subscription_timezone(sub))
            if not await ctx.advance_schedule(sub.id, scheduled, target, fired=fired):
                return None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cron schedule could not be advanced; will retry", extra={"subscription_id": sub.id})
            return None
        self._moved_past[sub.id] = scheduled
        return target

    async def _fire(self, ctx: SourceContext, sub: Subscription, scheduled: _dt.datetime) -> _dt.datetime | None:
        """Publish one tick and advance the schedule. Returns the next tick time when it may fire,
        None when the schedule is done or the tick must be retried later."""
        scheduled_iso = scheduled.isoformat()
        # Same subscription + same scheduled time → same id on every replica and after a restart,
        # so the bus and the execution records recognise a tick published twice.
        event_id = derived_id(KIND, sub.id, scheduled_iso)
        event = Event(
            id=event_id,
            source=f"/headwater/cron/{sub.id}",
            type=EVENT_TYPE,
            subject=sub.id,
            time=scheduled,
            data={"subscription_id": sub.id, "scheduled_time": scheduled_iso},
            extensions={"projectid": sub.project_id},
        )
        extra = {"event_id": event_id, "subscription_id": sub.id}
        try:
            await ctx.publish(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Not advanced: the same tick (same id) is published again on a later pass.
            log.exception("cron tick could not be published; will retry", extra=extra)
            return None
        log.info("cron tick fired for %s at %s", sub.id, scheduled_iso, extra=extra)

        next_time: _dt.datetime | None = None
        if sub.pattern:
            try:
                # From the scheduled time, not now (as Qinling): after downtime each missed tick
                # fires once, in order.
                next_time = next_fire_time(sub.pattern, scheduled, _subscription_timezone(sub))
            except (ValueError, KeyError, TypeError, OverflowError):
                # No computable next tick (a pattern that no longer matches, a zone gone from the
                # tz database): ending the schedule beats re-publishing this tick forever.
                log.error("cron schedule has no next time; marking it done", extra=extra, exc_info=True)
        try:
            advanced = await ctx.advance_schedule(sub.id, scheduled, next_time)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cron schedule could not be advanced; will retry", extra=extra)
            return None
        if not advanced:
            # Another replica moved it on first; its tick had the same id, so nothing is lost.
            log.debug("cron schedule already advanced by another replica", extra=extra)
        self._moved_past[sub.id] = scheduled
        if not advanced:
            return None
        if (sub.options or {}).get("overlap") == "replace":
            await self._replace_previous(ctx, sub, scheduled, event_id, next_time)
        return next_time

    async def _replace_previous(self, ctx: SourceContext, sub: Subscription, scheduled: _dt.datetime, event_id: str,
                                next_time: _dt.datetime | None) -> None:
        """overlap=replace: stop the runs of earlier ticks that still run. Called after the tick is on
        the bus and this replica's compare-and-set moved the schedule past it, so it happens once per
        tick on one replica, never for a stale tick a lagging replica re-publishes; the tick's own
        execution (which may have started already) is spared by its event id."""
        if next_time is not None and next_time + _jitter(sub, next_time) <= self._now():
            # Catching up after downtime: the next tick is due already and replaces this one's run
            # too. Cancelling now could race another replica firing that tick and stop its run.
            return
        extra = {"event_id": event_id, "subscription_id": sub.id}
        message = (f"Cancelled: a newer tick of the schedule ({scheduled.isoformat()}) replaced this run "
                   "while it was still running (overlap=replace).")
        try:
            stopped = await ctx.cancel_executions(sub.id, REPLACED, message=message, except_event=event_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The new tick runs regardless; the old run ends on its own (or by its timeout).
            log.exception("cron overlap=replace: the previous run could not be cancelled", extra=extra)
            return
        if stopped:
            log.info("cron tick replaced %d previous run(s) (overlap=replace)", stopped, extra=extra)
