"""The dashboard in a real browser (Playwright driving Debian's headless Chromium) against a real
`headwater serve`: create a function and subscriptions through the pages, watch an event arrive
in the live tail and the chart, read its trace and output, replay a dead letter. Screenshots of
each page go to HEADWATER_ARTIFACTS (default: a temporary directory the test prints)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.e2e.server import Server, make_zip
from tests.services import REQUIRE

CHROMIUM = os.environ.get("HEADWATER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 60_000  # a ceiling for conditions on a busy machine, never a speed assertion

HELLO = '''
def main(name="World", **kwargs):
    print("log line from hello, name=%s" % name)
    return {"greeting": "Hello, %s" % name}
'''
FAILING = '''
def main(**kwargs):
    raise ValueError("always fails")
'''


def _need_browser():
    reason = None
    if importlib.util.find_spec("playwright") is None:
        reason = "playwright is not installed (pip install -e '.[test]')"
    if reason is None and not shutil.which(CHROMIUM):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    if reason and REQUIRE:
        pytest.fail(f"{reason} and HEADWATER_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    path = Path(os.environ.get("HEADWATER_ARTIFACTS") or tmp_path_factory.mktemp("dashboard-screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("dashboard")) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(server):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        context.set_default_timeout(WAIT_MS)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/dashboard/")
        yield page
        browser.close()
        assert errors == [], f"JavaScript errors on the pages: {errors}"


def _shot(page, artifacts: Path, name: str) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def _open(page, hash_: str) -> None:
    page.evaluate("hash => { location.hash = hash; }", hash_)
    page.wait_for_selector("main:not([aria-busy])")


def test_operator_journey_through_the_dashboard(server, page, artifacts):
    from playwright.sync_api import expect

    # A runtime and a function, through the Functions page.
    _open(page, "#/functions")
    page.get_by_label("Image").fill("python3")
    page.locator("#runtime-form").get_by_label("Name").fill("python3")
    page.get_by_role("button", name="Add runtime").click()
    expect(page.locator("#function-form select[name=runtime_id] option")).to_have_count(1)
    form = page.locator("#function-form")
    form.get_by_label("Name").fill("hello")
    form.get_by_label("Entry").fill("hello.main")
    form.get_by_label("Package (zip)").set_input_files(
        {"name": "hello.zip", "mimeType": "application/zip", "buffer": make_zip({"hello.py": HELLO})})
    form.get_by_role("button", name="Create function").click()
    expect(page.get_by_role("heading", name="Function hello")).to_be_visible()
    function_id = re.search(r"#/functions/([0-9a-f-]+)", page.url).group(1)
    page.get_by_label("Input (JSON or text)").fill('{"name": "browser"}')
    page.get_by_role("button", name="Run now").click()
    expect(page.locator("#run-result")).to_contain_text("Hello, browser")
    _shot(page, artifacts, "function")
    _open(page, "#/functions")
    expect(page.get_by_role("link", name="hello")).to_be_visible()
    _shot(page, artifacts, "functions")

    # A subscription, its filter checked as it is typed and tested against a pasted event.
    _open(page, "#/subscriptions")
    sub_form = page.locator("#subscription-form")
    sub_form.get_by_label("Name").fill("big-orders")
    sub_form.get_by_label("Event types").fill("order.created")
    sub_form.get_by_label("Function").select_option(function_id)
    sub_form.get_by_label("Filter expression").fill("data.total >")
    expect(page.locator("#filter-verdict")).to_have_class("invalid")
    sub_form.get_by_label("Filter expression").fill("data.total > 100")
    expect(page.locator("#filter-verdict")).to_have_text("Filter is valid.")
    sub_form.get_by_label("Event (CloudEvent JSON; empty: the most recent event)").fill(json.dumps(
        {"specversion": "1.0", "id": "t", "source": "/shop", "type": "order.created", "data": {"total": 50}}))
    sub_form.get_by_role("button", name="Test this filter").click()
    expect(page.locator("#filter-test")).to_contain_text("data.total > 100.0 failed: the event's data.total is 50")
    _shot(page, artifacts, "subscription-form")
    sub_form.get_by_role("button", name="Create subscription").click()
    expect(page.get_by_role("link", name="big-orders")).to_be_visible()
    _shot(page, artifacts, "subscriptions")

    # Edit it: the filter is checked as it is typed here too, and saved.
    page.get_by_role("link", name="big-orders").click()
    edit = page.locator("#subscription-edit")
    expect(edit.get_by_label("Filter expression")).to_have_value("data.total > 100")
    edit.get_by_label("Filter expression").fill("data.total > 100 AND subject LIKE")
    expect(page.locator("#edit-verdict")).to_have_class("invalid")
    edit.get_by_label("Filter expression").fill("data.total > 100 AND subject LIKE 'orders/%'")
    expect(page.locator("#edit-verdict")).to_have_text("Filter is valid.")
    edit.get_by_role("button", name="Save").click()
    expect(page.locator("#status")).to_have_text(re.compile("Subscription big-orders saved"))
    _shot(page, artifacts, "subscription-edit")

    # An event arrives: the live tail shows it and the chart counts it.
    _open(page, "#/overview")
    expect(page.locator("#tail-state")).to_have_text("Live: waiting for events.")
    posted = server.request("POST", "/v1/events", {"specversion": "1.0", "id": "order-1", "source": "/shop",
                                                   "type": "order.created", "subject": "orders/1",
                                                   "data": {"total": 120, "name": "tail"}})
    assert posted.status == 202, posted.text
    line = page.locator('#tail li[data-event-id="order-1"]')
    expect(line).to_contain_text("order.created")
    # The chart refreshes every 5 s; the window's total, not this minute's (a minute may turn meanwhile).
    expect(page.locator("#chart .chart")).to_have_attribute("data-total-in", re.compile(r"^[1-9]\d*$"))
    _shot(page, artifacts, "overview")

    # Its trace: the matched subscription and the execution's output and log.
    executions = _wait_executions(server, "order-1")
    server.wait_execution(executions[0]["id"])
    _wait_recorded(server, "order-1")
    line.get_by_role("link", name="trace").click()
    expect(page.get_by_role("heading", name="Event order-1")).to_be_visible()
    expect(page.locator(".execution .output")).to_contain_text("Hello, tail")
    expect(page.locator(".execution .log")).to_contain_text("log line from hello")
    expect(page.get_by_role("table", name="Matched subscriptions")).to_contain_text("big-orders")
    _shot(page, artifacts, "event-trace")

    # An event the subscription rejects: the trace names the condition.
    server.request("POST", "/v1/events", {"specversion": "1.0", "id": "order-2", "source": "/shop",
                                          "type": "order.created", "data": {"total": 5}})
    _wait_recorded(server, "order-2")
    _open(page, "#/events/order-2")
    page.get_by_role("table", name="Subscriptions that did not match").get_by_role("link", name="big-orders").click()
    expect(page.locator("#verdict")).to_contain_text("data.total > 100.0 failed: the event's data.total is 5")
    _shot(page, artifacts, "event-not-matched")

    # A dead letter (a function that always fails, one attempt), replayed from its page.
    failing = server.multipart("/v1/functions", {"runtime_id": _runtime(server), "entry": "fail.main", "name": "failing",
                                                 "code": json.dumps({"source": "package"})},
                               {"package": make_zip({"fail.py": FAILING})}).json()
    _open(page, "#/subscriptions")
    sub_form = page.locator("#subscription-form")
    sub_form.get_by_label("Name").fill("always-fails")
    sub_form.get_by_label("Event types").fill("order.broken")
    sub_form.get_by_label("Function").select_option(failing["id"])
    sub_form.get_by_label("Attempts before dead letter").fill("1")
    sub_form.get_by_role("button", name="Create subscription").click()
    expect(page.get_by_role("link", name="always-fails")).to_be_visible()
    server.request("POST", "/v1/events", {"specversion": "1.0", "id": "broken-1", "source": "/shop", "type": "order.broken"})
    letter = _wait_dead_letter(server, "broken-1")
    _open(page, "#/deadletters")
    expect(page.get_by_role("table", name="Dead letters")).to_contain_text("always fails")
    _shot(page, artifacts, "deadletters")
    page.get_by_role("button", name=f"Replay dead letter {letter['id']}").click()
    expect(page.get_by_role("heading", name=re.compile(r"Event broken-1:replay:"))).to_be_visible()
    replayed = re.search(r"#/events/(.+)$", page.url).group(1)
    assert [e["subscription_id"] for e in _wait_executions(server, replayed.replace("%3A", ":"))]
    assert server.request("GET", f"/v1/deadletters/{letter['id']}").status == 404

    # Executions, filtered.
    _open(page, "#/executions?status=success")
    expect(page.get_by_role("table", name="Executions")).to_contain_text("success")
    _shot(page, artifacts, "executions")

    # Signed in with a token: every API request carries it (the API, with Keystone on, scopes by it),
    # and so does the live tail's stream; "Project" narrows lists to that project.
    _open(page, "#/deadletters")
    page.get_by_label("Keystone token").fill("token-for-the-test")
    page.get_by_label("Project").fill("default")
    with page.expect_request(lambda r: "/v1/deadletters" in r.url) as listed:
        page.get_by_role("button", name="Use").click()
    assert listed.value.all_headers().get("x-auth-token") == "token-for-the-test"
    assert "project_id=default" in listed.value.url
    with page.expect_request(lambda r: "/dashboard/api/stream" in r.url) as tailed:
        _open(page, "#/overview")
    assert tailed.value.all_headers().get("x-auth-token") == "token-for-the-test"
    page.get_by_label("Keystone token").fill("")
    page.get_by_label("Project").fill("")
    page.get_by_role("button", name="Use").click()

    # A narrow window still shows the navigation and the page.
    page.set_viewport_size({"width": 380, "height": 800})
    _open(page, "#/overview")
    expect(page.get_by_role("navigation", name="Pages")).to_be_visible()
    _shot(page, artifacts, "overview-narrow")
    for name in ("functions", "function", "subscriptions", "overview", "event-trace", "deadletters", "executions"):
        assert (artifacts / f"{name}.png").stat().st_size > 0


def _runtime(server) -> str:
    return server.request("GET", "/v1/runtimes").json()["runtimes"][0]["id"]


def _poll(fetch, what: str, timeout: float = 60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = fetch()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what} not seen within {timeout}s")


def _wait_executions(server, event_id: str) -> list[dict]:
    return _poll(lambda: server.request("GET", f"/v1/executions?event_id={event_id}").json()["executions"],
                 f"an execution of event {event_id}")


def _wait_recorded(server, event_id: str) -> None:
    _poll(lambda: server.request("GET", f"/v1/events/{event_id}").status == 200, f"event {event_id} in the history")


def _wait_dead_letter(server, event_id: str) -> dict:
    return _poll(lambda: server.request("GET", f"/v1/deadletters?event_id={event_id}").json()["deadletters"],
                 f"a dead letter for {event_id}")[0]
