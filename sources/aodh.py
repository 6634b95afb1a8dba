"""Aodh source: alarm actions POSTed by aodh-notifier become one event per state transition; `register` creates such alarms."""

from __future__ import annotations

import argparse
import datetime as _dt
import hmac
import json
import logging
import sys
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from router.config import Config, persistent_secret
from router.events import Event, derived_id, utcnow
from router.plugins import CredentialsUnavailable, SourceContext, SubscriptionInvalid

log = logging.getLogger(__name__)

KIND = "aodh"
TYPE_PREFIX = "org.openstack.aodh.alarm."  # + new state: alarm, ok, insufficient_data
STATES = ("ok", "alarm", "insufficient data")
SEVERITIES = ("low", "moderate", "critical")
BODY_KEYS = ("alarm_name", "alarm_id", "severity", "previous", "current", "reason", "reason_data")
EXTENSIONS = ("projectid", "alarmname", "alarmid", "severity", "alarmstate", "previousstate", "partitionkey")
_CORE = ("id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "specversion", "sourcekind")


class MalformedAlarm(ValueError):
    """A POST that is not the seven-key body of Aodh's REST notifier."""


def state_name(state: str) -> str:
    """An Aodh state as it appears in event types and filters (`insufficient data` → `insufficient_data`)."""
    return state.replace(" ", "_")


def _generated(reason_data: dict[str, Any]) -> _dt.datetime | None:
    event = reason_data.get("event")
    value = event.get("generated") if isinstance(event, dict) else None
    if not isinstance(value, str):
        return None
    try:
        parsed = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def alarm_event(body: Any, *, project_id: str, request_id: str | None = None) -> Event:
    """The event for one alarm action POST. Raises MalformedAlarm naming the fault."""
    if not isinstance(body, dict):
        raise MalformedAlarm("body is not a JSON object")
    missing = [key for key in BODY_KEYS if key not in body]
    if missing:
        raise MalformedAlarm(f"missing keys: {', '.join(missing)}")
    for key in BODY_KEYS[:-1]:
        if not isinstance(body[key], str) or (key != "reason" and not body[key]):
            raise MalformedAlarm(f"{key} must be a non-empty string")
    for key in ("previous", "current"):
        if body[key] not in STATES:
            raise MalformedAlarm(f"{key} is {body[key]!r}, not one of {', '.join(STATES)}")
    if body["severity"] not in SEVERITIES:
        raise MalformedAlarm(f"severity is {body['severity']!r}, not one of {', '.join(SEVERITIES)}")
    reason_data = body["reason_data"]
    if not isinstance(reason_data, dict):
        raise MalformedAlarm("reason_data must be an object")

    alarm_id, current = body["alarm_id"], body["current"]
    triggering = reason_data.get("event") if reason_data.get("type") == "event" else None
    triggering_id = triggering.get("message_id") if isinstance(triggering, dict) else None
    # Aodh never redelivers an action, but urllib3 may resend one POST after a connection error
    # (rest_notifier_max_retries): the same request id, or for event alarms the same triggering
    # event, is then the same Headwater event. Without either every POST is new.
    if isinstance(triggering_id, str) and triggering_id:
        event_id = derived_id(KIND, alarm_id, triggering_id, current)
    elif request_id:
        event_id = derived_id(KIND, alarm_id, request_id)
    else:
        event_id = str(uuid.uuid4())
    return Event(
        id=event_id,
        source=f"/aodh/alarms/{alarm_id}",
        type=TYPE_PREFIX + state_name(current),
        subject=body["alarm_name"],
        time=_generated(reason_data) or utcnow(),
        data=body,
        extensions={
            "projectid": project_id, "alarmname": body["alarm_name"], "alarmid": alarm_id,
            "severity": body["severity"], "alarmstate": state_name(current),
            "previousstate": state_name(body["previous"]), "partitionkey": alarm_id,
        },
    )


TOKEN_FILE = "aodh-token.key"
_VERIFIED_MAX = 10_000  # alarms whose project Aodh confirmed, kept (an alarm never changes project)
_TIMEOUT = aiohttp.ClientTimeout(total=10)


class NotVerified(Exception):
    """Aodh did not confirm that the alarm is the claimed project's; `status` is the answer to give."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AodhSource:
    """The endpoint alarm actions point at: POST <[aodh] path>[?project_id=…&token=…]."""

    kind: ClassVar[str] = KIND

    def __init__(self, config: Config):
        self.config = config
        self._ctx: SourceContext | None = None
        # Under Keystone the action URL's project_id is only a claim (the URL and its token are
        # shared): Aodh is asked, as a creator of that project's subscriptions, whether the alarm
        # is the project's, before its event may reach the project.
        self.verify = config.auth.strategy == "keystone"
        self._verified: dict[str, str] = {}
        self._session: aiohttp.ClientSession | None = None

    def validate_subscription(self, params: dict[str, Any], now: _dt.datetime) -> dict[str, Any]:
        for field in ("pattern", "first_execution_time", "count"):
            if params.get(field) is not None:
                raise SubscriptionInvalid(f"{field} is a cron option; aodh subscriptions take types and filters.")
        filters = params.get("filters") or {}
        if isinstance(filters, dict):
            for name, value in filters.items():
                if name not in EXTENSIONS and name not in _CORE:
                    raise SubscriptionInvalid(f"aodh events have no attribute {name!r}; filter on one of: {', '.join(EXTENSIONS)}.")
                if name in ("alarmstate", "previousstate") and value not in {state_name(s) for s in STATES}:
                    raise SubscriptionInvalid(f"{name} is one of {', '.join(state_name(s) for s in STATES)}.")
        return {}

    async def start(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        self.token = endpoint_token(self.config)
        ctx.add_route("POST", self.config.aodh.path, self.receive, public=True)

    async def stop(self) -> None:
        self._ctx = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def receive(self, request: web.Request) -> web.Response:
        """One alarm action. Aodh retries nothing on an HTTP error and sets no timeout, so this
        answers as soon as the event is on the bus."""
        assert self._ctx is not None
        ctx = self._ctx
        if not hmac.compare_digest(request.query.get("token", ""), self.token):
            log.warning("aodh alarm action refused: missing or wrong token")
            return web.json_response({"error": "missing or wrong token"}, status=401)
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        project_id = request.query.get("project_id") or self.config.aodh.project_id
        try:
            event = alarm_event(body, project_id=project_id, request_id=request.headers.get("x-openstack-request-id"))
        except MalformedAlarm as exc:
            await ctx.dead_letter(source=KIND, reason=f"malformed aodh alarm action: {exc}", payload=body,
                                  project_id=project_id)
            return web.json_response({"error": str(exc)}, status=400)
        if self.verify:
            try:
                await self._confirm(ctx, body["alarm_id"], project_id)
            except NotVerified as exc:
                log.warning("aodh alarm action refused: %s", exc, extra={"event_id": event.id, "project_id": project_id})
                return web.json_response({"error": str(exc)}, status=exc.status)
        await ctx.publish(event)
        log.info("aodh alarm %s %s -> %s", body["alarm_name"], body["previous"], body["current"], extra={"event_id": event.id})
        return web.json_response({"event_id": event.id}, status=202)


    async def _confirm(self, ctx: SourceContext, alarm_id: str, project_id: str) -> None:
        """Ask Aodh ([aodh] endpoint) for the alarm with a token of the claimed project (the trust
        of one of its aodh subscriptions): Aodh shows a project's token only that project's alarms,
        so a 200 naming the project is the proof. Raises NotVerified."""
        if self._verified.get(alarm_id) == project_id:
            return
        subs = [s for s in ctx.subscriptions(KIND) if s.project_id == project_id and (s.options or {}).get("trust_id")]
        if not subs:
            raise NotVerified(403, f"no aodh subscription of project {project_id} with a Keystone trust to confirm "
                                   f"that alarm {alarm_id} is the project's")
        url = f"{self.config.aodh.endpoint.rstrip('/')}/v2/alarms/{alarm_id}"
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        unavailable = "no token"
        for sub in subs:
            for fresh in (False, True):
                try:
                    token = await ctx.credentials.token(sub, fresh=fresh)
                    if token is None:
                        break
                    async with self._session.get(url, headers={"X-Auth-Token": token, "Accept": "application/json"}) as resp:
                        status = resp.status
                        alarm = await resp.json(content_type=None) if status == 200 else None
                except CredentialsUnavailable as exc:
                    unavailable = str(exc)  # that creator's trust is gone: another subscription's may serve
                    break
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise NotVerified(503, f"Aodh at {self.config.aodh.endpoint} could not be asked about alarm "
                                           f"{alarm_id}: {type(exc).__name__}") from None
                if status == 401 and not fresh:
                    continue  # the kept token was refused: once more with a new one
                if status == 200 and isinstance(alarm, dict) and alarm.get("project_id") == project_id:
                    if len(self._verified) >= _VERIFIED_MAX:
                        self._verified.clear()
                    self._verified[alarm_id] = project_id
                    return
                if status in (200, 403, 404):
                    raise NotVerified(403, f"alarm {alarm_id} is not an alarm of project {project_id} (Aodh)")
                raise NotVerified(503, f"Aodh answered {status} when asked about alarm {alarm_id}")
        raise NotVerified(503, f"no Keystone token of project {project_id} to ask Aodh with: {unavailable}")


# ---------------------------------------------------------------------------------------------
# Registering alarms whose action targets Headwater (aodhclient, the `openstack` extra)


def endpoint_token(config: Config) -> str:
    """The token alarm actions must carry: [aodh] token, else one generated once per data_dir.
    Never none: without it anyone could POST a forged alarm and run functions."""
    return config.aodh.token or persistent_secret(config, TOKEN_FILE)


def action_url(config: Config, project_id: str | None = None) -> str:
    """The alarm action URL for this Headwater: public URL + [aodh] path, with the project and the
    shared token in the query (Aodh POSTs to the URL as stored, query included)."""
    query = {}
    if project_id:
        query["project_id"] = project_id
    query["token"] = endpoint_token(config)
    return f"{config.api.public_url}{config.aodh.path}" + (f"?{urlencode(query)}" if query else "")


def parse_query(items: Sequence[str]) -> list[dict[str, str]]:
    """aodh's CLI query syntax, `field=type::value` or `field=value` (string), e.g. `traits.action=string::update`."""
    out = []
    for item in items:
        field, sep, rest = item.partition("=")
        if not sep or not field:
            raise ValueError(f"query {item!r} is not field=[type::]value")
        type_, sep, value = rest.partition("::")
        if not sep:
            type_, value = "string", rest
        out.append({"field": field, "op": "eq", "type": type_, "value": value})
    return out


def build_alarm(*, name: str, url: str, event_type: str = "*", query: Sequence[str] = (), severity: str = "moderate",
                repeat_actions: bool = True, description: str | None = None) -> dict[str, Any]:
    """An Aodh event alarm whose alarm action POSTs to Headwater."""
    alarm: dict[str, Any] = {
        "name": name, "type": "event", "severity": severity, "repeat_actions": repeat_actions,
        "alarm_actions": [url], "event_rule": {"event_type": event_type, "query": parse_query(query)},
    }
    if description:
        alarm["description"] = description
    return alarm


def aodh_client(*, endpoint: str, user_id: str | None = None, project_id: str | None = None, roles: str = "admin",
                auth_url: str | None = None, username: str | None = None, password: str | None = None,
                project_name: str | None = None, user_domain_name: str = "Default", project_domain_name: str = "Default") -> Any:
    """An aodhclient v2 client: Keystone password auth when auth_url is given, else Aodh's noauth headers."""
    try:
        from aodhclient import client as aodh
        from keystoneauth1 import session as ks_session
    except ImportError as exc:
        raise RuntimeError("registering alarms needs aodhclient: pip install 'headwater[openstack]'") from exc
    if auth_url:
        from keystoneauth1.identity import v3

        auth = v3.Password(auth_url=auth_url, username=username, password=password, project_name=project_name,
                           user_domain_name=user_domain_name, project_domain_name=project_domain_name)
        return aodh.Client(2, session=ks_session.Session(auth=auth))
    from aodhclient import noauth

    plugin = noauth.AodhNoAuthPlugin(user_id=user_id or "headwater", project_id=project_id or "default", roles=roles, endpoint=endpoint)
    return aodh.Client(2, session=ks_session.Session(auth=plugin))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sources.aodh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    reg = sub.add_parser("register", help="create an Aodh event alarm whose action POSTs to this Headwater")
    reg.add_argument("--config-file", action="append", default=[], help="Headwater configuration (for public_url and [aodh])")
    reg.add_argument("--name", required=True)
    reg.add_argument("--event-type", default="*", help="fnmatch pattern of the ceilometer event type")
    reg.add_argument("--query", action="append", default=[], help="field=[type::]value, e.g. traits.action=string::update (repeatable, ANDed)")
    reg.add_argument("--severity", default="moderate", choices=SEVERITIES)
    reg.add_argument("--no-repeat-actions", dest="repeat_actions", action="store_false",
                     help="fire once only (an event alarm never returns to ok)")
    reg.add_argument("--description")
    reg.add_argument("--aodh-endpoint", help="default: [aodh] endpoint")
    reg.add_argument("--project-id", help="owner of the alarm (noauth) and of the events; default [aodh] project_id")
    reg.add_argument("--user-id", default="headwater", help="noauth user")
    reg.add_argument("--roles", default="admin", help="noauth roles")
    reg.add_argument("--os-auth-url", help="Keystone: use password auth instead of Aodh's noauth headers")
    reg.add_argument("--os-username")
    reg.add_argument("--os-password")
    reg.add_argument("--os-project-name")
    args = parser.parse_args(argv)

    config = Config.load(args.config_file)
    project_id = args.project_id or config.aodh.project_id
    alarm = build_alarm(name=args.name, url=action_url(config, project_id), event_type=args.event_type, query=args.query,
                        severity=args.severity, repeat_actions=args.repeat_actions, description=args.description)
    client = aodh_client(endpoint=args.aodh_endpoint or config.aodh.endpoint, user_id=args.user_id, project_id=project_id,
                         roles=args.roles, auth_url=args.os_auth_url, username=args.os_username, password=args.os_password,
                         project_name=args.os_project_name)
    created = client.alarm.create(alarm)
    json.dump({k: created.get(k) for k in ("alarm_id", "name", "state", "project_id", "alarm_actions")}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
