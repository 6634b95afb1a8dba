"""Distributed tracing end to end: a real `headwater serve` exporting to an OTLP receiver in this
test. One webhook invocation is one trace: API → bus publish → route → engine → runtime, and a
span the function makes itself (from the traceparent in its context) joins it. Logs carry the
trace id."""

from __future__ import annotations

import http.server
import importlib.util
import json
import threading
import time

import pytest

from tests.e2e.server import Server, make_zip
from tests.services import REQUIRE

TRACED = '''
def main(collector=None, context=None, **kwargs):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector)))
    parent = TraceContextTextMapPropagator().extract({"traceparent": context["traceparent"]})
    with provider.get_tracer("function").start_as_current_span("inside the function", context=parent):
        print("working")
    provider.shutdown()
    return "traced"
'''


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver (protobuf from the OpenTelemetry SDK, JSON from the runtime):
    keeps every span as {trace_id, span_id, parent, name, service}."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        spans = _from_json(json.loads(body)) if "json" in self.headers.get("Content-Type", "") else _from_protobuf(body)
        with self.server.lock:
            self.server.spans.extend(spans)
        self.send_response(200)
        self.send_header("Content-Type", self.headers.get("Content-Type", "application/x-protobuf"))
        self.end_headers()
        self.wfile.write(b"{}" if "json" in self.headers.get("Content-Type", "") else b"")


def _service(attributes) -> str:
    return next((a["value"]["stringValue"] for a in attributes if a["key"] == "service.name"), "")


def _from_json(doc: dict) -> list[dict]:
    return [{"trace_id": s["traceId"], "span_id": s["spanId"], "parent": s.get("parentSpanId", ""), "name": s["name"],
             "service": _service(rs["resource"]["attributes"])}
            for rs in doc["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]


def _from_protobuf(body: bytes) -> list[dict]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(body)
    out = []
    for rs in request.resource_spans:
        service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append({"trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                            "name": s.name, "service": service})
    return out


@pytest.fixture
def receiver():
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        if REQUIRE:
            pytest.fail("OpenTelemetry is not installed (the test extra has it) and HEADWATER_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip("OpenTelemetry is not installed (pip install -e '.[test]')")
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_one_webhook_invocation_is_one_trace_from_the_api_to_a_span_inside_the_function(receiver, tmp_path, monkeypatch):
    # The function imports the OpenTelemetry SDK from this test's environment, which a sandbox uid
    # may not be able to read (under /root): the runtime runs it as this user.
    monkeypatch.setenv("HEADWATER_RUNTIME_SANDBOX", "off")
    (tmp_path / "hw").mkdir()
    # The function sends its own span to the test's collector on this machine's loopback, which a
    # function's private network namespace (the default) cannot reach: this one gets the host's.
    config = f"[tracing]\notlp_endpoint = {receiver.url}\n[engine]\nfunction_network = host\n"
    with Server(tmp_path / "hw", config_text=config) as server:
        runtime = server.request("POST", "/v1/runtimes", {"image": "python3"}).json()
        fn = server.multipart("/v1/functions", {"runtime_id": runtime["id"], "entry": "traced.main", "name": "traced",
                                                "memory_size": "134217728", "code": json.dumps({"source": "package"})},
                              {"package": make_zip({"traced.py": TRACED})}).json()
        hook = server.request("POST", "/v1/webhooks", {"function_id": fn["id"]}).json()
        invoked = server.request("POST", hook["webhook_url"], {"collector": receiver.url + "/v1/traces"})
        assert invoked.status == 202, invoked.text
        execution = server.wait_execution(invoked.json()["execution_id"], timeout=60)
        assert execution["status"] == "success", (execution, server.request("GET", f"/v1/executions/{execution['id']}/log").text)

        def spans_of_the_invocation() -> list[dict]:
            with receiver.lock:
                spans = list(receiver.spans)
            api = [s for s in spans if s["name"] == "POST /v1/webhooks/{id}/invoke"]
            return [s for s in spans if api and s["trace_id"] == api[0]["trace_id"]]

        deadline = time.monotonic() + 60  # the server exports in batches every few seconds
        while len(spans_of_the_invocation()) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        trace = {s["name"]: s for s in spans_of_the_invocation()}
        published = [name for name in trace if name.startswith("publish ")]  # "publish <event type>"
        assert len(published) == 1, sorted(trace)
        assert set(trace) - set(published) == {"POST /v1/webhooks/{id}/invoke", "route", "engine execute traced",
                                               "runtime execute traced.main", "inside the function"}, sorted(trace)
        publish = trace[published[0]]
        # Each span is the child of the one before it: one unbroken trace.
        chain = [trace["POST /v1/webhooks/{id}/invoke"], publish, trace["route"], trace["engine execute traced"],
                 trace["runtime execute traced.main"], trace["inside the function"]]
        for parent, child in zip(chain, chain[1:]):
            assert child["parent"] == parent["span_id"], (parent["name"], child["name"])
        assert chain[0]["parent"] == "" and chain[0]["service"] == "headwater"
        assert trace["runtime execute traced.main"]["service"] == "headwater-runtime-python3"
        # No other trace holds a part of this invocation's trip.
        with receiver.lock:
            others = [s for s in receiver.spans if s["trace_id"] != chain[0]["trace_id"] and s["name"] in ("route", "inside the function")]
        assert others == []
        trace_id = chain[0]["trace_id"]
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(line.get("trace_id") == trace_id and line.get("execution_id") == execution["id"] for line in lines)


def test_without_a_collector_nothing_is_traced_and_events_carry_no_traceparent(tmp_path):
    with Server(tmp_path / "hw") as server:
        server.request("POST", "/v1/events", {"specversion": "1.0", "id": "plain-1", "source": "/t", "type": "t"})
        deadline = time.monotonic() + 30
        while (resp := server.request("GET", "/v1/events/plain-1")).status != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "traceparent" not in resp.json()["event"]
    assert "trace_id" not in server.log()
