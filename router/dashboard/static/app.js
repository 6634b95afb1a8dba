// The dashboard's pages, one function per page, chosen by the URL's hash (#/functions/ID …).
import { api, ApiError, scoped, session, stream } from "./api.js";
import { badge, field, h, pretty, shortId, table } from "./dom.js";
import { chart } from "./chart.js";

const main = document.getElementById("main");
const statusLine = document.getElementById("status");
let leaving = [];  // what the current page must stop (streams, timers) when another opens

function say(message, isError = false) {
  statusLine.textContent = message;
  statusLine.className = isError ? "error" : "";
}

function onLeave(stop) { leaving.push(stop); }

function link(hash, text) { return h("a", { href: hash }, text); }

function time(value) { return value ? String(value).replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : "—"; }

async function guarded(work) {
  try { return await work(); } catch (err) { say(err.message || String(err), true); return undefined; }
}

// ---------------------------------------------------------------------------------------------
// Overview: per-minute chart and the live tail

function overview() {
  const chartBox = h("div", { id: "chart", "aria-live": "off" }, "Loading…");
  const tail = h("ul", { class: "tail", id: "tail", "aria-live": "polite", "aria-relevant": "additions" });
  const filterInput = h("input", { name: "filter", placeholder: "type = 'com.example.order'" });
  const tailState = h("p", { class: "hint", id: "tail-state" }, "Connecting…");
  let controller = null;

  async function refreshChart() {
    const data = await api("GET", "/dashboard/api/minutes").catch((err) => err);
    if (data instanceof ApiError) { chartBox.replaceChildren(h("p", { class: "hint" }, data.message)); return; }
    if (data) chartBox.replaceChildren(chart(data.minutes));
  }

  function connect() {
    if (controller) controller.abort();
    controller = new AbortController();
    const query = filterInput.value.trim() ? { filter: filterInput.value.trim() } : {};
    tailState.textContent = "Connecting…";
    stream(scoped("/dashboard/api/stream", query), (kind, data) => {
      if (kind === "missed") { tail.prepend(h("li", { class: "hint" }, `${data.count} event(s) missed (too many at once).`)); return; }
      tail.prepend(h("li", { dataset: { eventId: data.id } },
        h("time", {}, time(data.time)), " ", h("strong", {}, data.type), " from ", data.source_kind || "?", " ",
        data.subject ? h("code", {}, data.subject) : "", " — ",
        link(`#/events/${encodeURIComponent(data.id)}`, "trace"), " · ",
        link(`#/executions?event_id=${encodeURIComponent(data.id)}`, "executions")));
      while (tail.children.length > 200) tail.lastChild.remove();
      tailState.textContent = "Live.";
    }, controller.signal, () => { tailState.textContent = "Live: waiting for events."; }).catch((err) => {
      if (err.name !== "AbortError") tailState.textContent = `Tail stopped: ${err.message}`;
    });
  }

  const timer = setInterval(refreshChart, 5000);
  onLeave(() => { clearInterval(timer); if (controller) controller.abort(); });
  refreshChart();
  connect();
  return [
    h("h2", {}, "Overview"),
    h("div", { class: "grid" },
      h("section", { "aria-labelledby": "chart-h" }, h("h3", { id: "chart-h" }, "Events per minute"), chartBox),
      h("section", { "aria-labelledby": "tail-h" }, h("h3", { id: "tail-h" }, "Live event tail"),
        h("form", { class: "panel", onsubmit: (e) => { e.preventDefault(); tail.replaceChildren(); connect(); } },
          field("Only events matching (filter expression)", filterInput), h("button", { type: "submit" }, "Apply")),
        tailState, tail)),
  ];
}

// ---------------------------------------------------------------------------------------------
// Event trace: the event, the routing decision, its executions

async function eventTrace(id, query) {
  const subscriptionId = query.get("subscription_id") || "";
  const path = `/v1/events/${encodeURIComponent(id)}` + (subscriptionId ? `?subscription_id=${encodeURIComponent(subscriptionId)}` : "");
  // The history writes events in batches: one seen in the live tail a moment ago may not be there yet.
  let record;
  for (let attempt = 1; !record; attempt++) {
    try { record = await api("GET", path); } catch (err) {
      if (err.status !== 404 || attempt >= 20) throw err;
      say("Waiting for the event to reach the history…");
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
  say("");
  const executions = (await api("GET", scoped("/v1/executions", { event_id: id }))).executions;
  const routing = record.routing || { matched: [], not_matched: [] };
  const explainInput = h("input", { name: "subscription_id", value: subscriptionId, placeholder: "subscription id" });
  const named = routing.subscription;
  const out = [
    h("h2", {}, "Event ", h("code", {}, id)),
    table("Event attributes", ["type", "source", "subject", "source kind", "time", "project"],
      [[record.type, record.source, record.subject || "—", record.source_kind, time(record.time), record.project_id]]),
    h("details", {}, h("summary", {}, "Event document"), h("pre", {}, pretty(record.event))),
    h("h3", {}, "Routing decision"),
    h("p", {}, `Matched ${routing.matched.length} subscription(s) (with today's subscriptions).`),
    table("Matched subscriptions", ["subscription", "function"], routing.matched.map((s) => [
      link(`#/subscriptions/${s.subscription_id}`, s.name || shortId(s.subscription_id)),
      s.function_id ? link(`#/functions/${s.function_id}`, shortId(s.function_id)) : s.function_alias || "—"])),
    h("h3", {}, "Not matched, and why"),
    table("Subscriptions that did not match", ["subscription", "why not"], routing.not_matched.map((s) => [
      link(`#/events/${encodeURIComponent(id)}?subscription_id=${s.subscription_id}`, s.name || shortId(s.subscription_id)),
      h("ul", { class: "reasons" }, s.reasons.map((r) => h("li", {}, r)))])),
    h("form", { class: "panel", onsubmit: (e) => {
      e.preventDefault(); location.hash = `#/events/${encodeURIComponent(id)}?subscription_id=${encodeURIComponent(explainInput.value.trim())}`;
    } }, field("Explain for subscription", explainInput), h("button", { type: "submit" }, "Explain")),
  ];
  if (named) {
    out.push(h("section", { class: "panel", id: "verdict", "aria-labelledby": "verdict-h" },
      h("h3", { id: "verdict-h" }, `Subscription ${named.name || named.subscription_id}: `,
        named.matched ? h("span", { class: "valid" }, "matches") : h("span", { class: "invalid" }, "does not match")),
      h("ul", { class: "reasons" }, named.reasons.map((r) => h("li", {}, r)))));
  }
  out.push(h("h3", {}, "Executions"));
  if (!executions.length) out.push(h("p", {}, "No execution for this event."));
  for (const e of executions) {
    const result = e.result ? JSON.parse(e.result) : {};
    const logBox = h("pre", { class: "log" }, "");
    out.push(h("section", { class: "panel execution", dataset: { executionId: e.id } },
      h("h4", {}, "Execution ", h("code", {}, e.id), " ", badge(e.status)),
      table("Execution", ["subscription", "attempts", "started", "finished", "duration (s)", "reason"],
        [[e.subscription_id ? link(`#/subscriptions/${e.subscription_id}`, shortId(e.subscription_id)) : "—",
          e.attempts ?? "—", time(e.created_at), time(e.updated_at), result.duration ?? "—", e.reason || "—"]]),
      h("p", {}, h("strong", {}, "Output")), h("pre", { class: "output" }, pretty(result.output)),
      h("p", {}, h("strong", {}, "Log")), logBox));
    api("GET", `/v1/executions/${e.id}/log`, { text: true }).then((t) => { logBox.textContent = t || "(empty)"; })
      .catch((err) => { logBox.textContent = err.message; });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Functions: list, create (with a runtime), one function's versions, aliases, workers, run, history

async function functions() {
  const [{ functions: fns }, { runtimes }] = await Promise.all([api("GET", scoped("/v1/functions")), api("GET", scoped("/v1/runtimes"))]);
  const runtimeSelect = h("select", { name: "runtime_id", required: true },
    runtimes.map((r) => h("option", { value: r.id }, `${r.name || r.image} (${r.status})`)));
  const create = h("form", { class: "panel", id: "function-form", onsubmit: async (e) => {
    e.preventDefault();
    const form = new FormData(create);
    form.set("code", JSON.stringify({ source: "package" }));
    for (const key of ["name", "entry"]) if (!form.get(key)) form.delete(key);
    const created = await guarded(() => api("POST", "/v1/functions", { form }));
    if (created) { say(`Function ${created.name || created.id} created.`); location.hash = `#/functions/${created.id}`; }
  } },
    h("h3", {}, "New function"),
    field("Name", h("input", { name: "name" })),
    field("Runtime", runtimeSelect),
    field("Entry", h("input", { name: "entry", placeholder: "hello.main" }), "module.function inside the package"),
    field("Package (zip)", h("input", { name: "package", type: "file", accept: ".zip,application/zip", required: true })),
    h("button", { type: "submit", class: "primary" }, "Create function"));
  const runtimeForm = h("form", { class: "panel", id: "runtime-form", onsubmit: async (e) => {
    e.preventDefault();
    const body = Object.fromEntries(new FormData(runtimeForm));
    if (await guarded(() => api("POST", "/v1/runtimes", { json: body }))) { say("Runtime added."); render(); }
  } },
    h("h3", {}, "New runtime"),
    field("Image", h("input", { name: "image", required: true, placeholder: "python3" })),
    field("Name", h("input", { name: "name" })),
    h("button", { type: "submit" }, "Add runtime"));
  return [
    h("h2", {}, "Functions"),
    table("Functions", ["name", "id", "runtime", "entry", "created"], fns.map((f) => [
      link(`#/functions/${f.id}`, f.name || "(unnamed)"), h("code", {}, shortId(f.id)), shortId(f.runtime_id), f.entry || "—", time(f.created_at)])),
    h("div", { class: "grid" }, create, runtimeForm),
  ];
}

async function functionPage(id) {
  const fn = await api("GET", `/v1/functions/${id}`);
  const [versions, aliases, history] = await Promise.all([
    api("GET", `/v1/functions/${id}/versions`).then((b) => b.function_versions).catch(() => []),
    api("GET", scoped("/v1/aliases", { function_id: id })).then((b) => b.function_aliases).catch(() => []),
    api("GET", scoped("/v1/executions", { function_id: id })).then((b) => b.executions).catch(() => []),
  ]);
  const workers = await api("GET", `/v1/functions/${id}/workers`).then((b) => b.workers).catch((err) => err.message);
  const inputBox = h("textarea", { name: "input", placeholder: '{"name": "Headwater"}' });
  const resultBox = h("pre", { id: "run-result", "aria-live": "polite" }, "");
  const run = h("form", { class: "panel", id: "run-form", onsubmit: async (e) => {
    e.preventDefault();
    resultBox.textContent = "Running…";
    const body = { function_id: id, sync: true };
    if (inputBox.value.trim()) body.input = inputBox.value;
    const done = await guarded(() => api("POST", "/v1/executions", { json: body }));
    resultBox.textContent = done ? `${done.status}\n${pretty(done.result)}` : "";
  } }, h("h3", {}, "Run"), field("Input (JSON or text)", inputBox), h("button", { type: "submit", class: "primary" }, "Run now"), resultBox);
  return [
    h("h2", {}, "Function ", fn.name || fn.id),
    table("Function", ["id", "runtime", "entry", "code", "created"],
      [[h("code", {}, fn.id), shortId(fn.runtime_id), fn.entry || "—", pretty(fn.code), time(fn.created_at)]]),
    h("h3", {}, "Versions"),
    table("Versions", ["version", "description", "created"], versions.map((v) => [v.version_number, v.description || "—", time(v.created_at)])),
    h("h3", {}, "Aliases"),
    table("Aliases", ["name", "version", "description"], aliases.map((a) => [a.name, a.function_version, a.description || "—"])),
    h("h3", {}, "Warm workers"),
    typeof workers === "string" ? h("p", { class: "hint" }, workers)
      : table("Workers", ["worker", "version"], workers.map((w) => [w.worker_name || pretty(w), w.function_version ?? "—"])),
    run,
    h("h3", {}, "History"),
    executionTable(history),
  ];
}

function executionTable(rows) {
  return table("Executions", ["execution", "status", "event", "subscription", "created", "reason"], rows.map((e) => [
    h("code", {}, shortId(e.id)), badge(e.status),
    e.event_id ? link(`#/events/${encodeURIComponent(e.event_id)}`, shortId(e.event_id)) : "—",
    e.subscription_id ? link(`#/subscriptions/${e.subscription_id}`, shortId(e.subscription_id)) : "—",
    time(e.created_at), e.reason || ""]));
}

// ---------------------------------------------------------------------------------------------
// Subscriptions: list, create with the filter checked as it is typed, "test this filter"

// The filter fields of a subscription form, checked by the server as they are typed.
function filterFields(prefix, initial = {}) {
  const filtersBox = h("textarea", { name: "filters", placeholder: '{"subject": {"prefix": "orders/"}}' });
  filtersBox.value = initial.filters && Object.keys(initial.filters).length ? JSON.stringify(initial.filters) : "";
  const expressionBox = h("input", { name: "filter", placeholder: "data.total > 100 AND type = 'order.created'" });
  expressionBox.value = typeof initial.filter === "string" ? initial.filter : initial.filter ? JSON.stringify(initial.filter) : "";
  const verdict = h("p", { id: `${prefix}-verdict`, role: "status", "aria-live": "polite" }, "");

  function body() {
    const out = { filter: expressionBox.value.trim() || null };
    if (out.filter && out.filter.startsWith("{")) {  // an all/any/not composition, shown as JSON
      try { out.filter = JSON.parse(out.filter); } catch { /* the server names the fault */ }
    }
    const raw = filtersBox.value.trim();
    if (raw) {
      try { out.filters = JSON.parse(raw); } catch (err) { return { error: `filters is not JSON: ${err.message}` }; }
    } else out.filters = {};
    return out;
  }
  let pending = 0;
  async function check() {
    const mine = ++pending;
    const filter = body();
    if (filter.error) { verdict.className = "invalid"; verdict.textContent = filter.error; return; }
    const answer = await api("POST", "/dashboard/api/filter", { json: filter }).catch((err) => ({ valid: false, error: err.message }));
    if (mine !== pending) return;  // a later keystroke's answer wins
    verdict.className = answer.valid ? "valid" : "invalid";
    verdict.textContent = answer.valid ? "Filter is valid." : answer.error;
  }
  let debounce;
  const typed = () => { clearTimeout(debounce); debounce = setTimeout(check, 250); };
  filtersBox.addEventListener("input", typed);
  expressionBox.addEventListener("input", typed);
  const fields = [
    field("Filters (JSON object)", filtersBox, "attribute → value or {prefix|suffix|glob|gt|gte|lt|lte|exists|in|ne|eq: …}"),
    field("Filter expression", expressionBox, "subject LIKE 'photos/%' AND data.size > 1000"),
    verdict];
  return { fields, body };
}

function editForm(sub) {
  const filter = filterFields("edit", sub);
  const form = h("form", { class: "panel", id: "subscription-edit", onsubmit: async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const body = filter.body();
    if (body.error) { say(body.error, true); return; }
    if (sub.source === "cron") { delete body.filters; delete body.filter; }
    body.name = data.get("name") || null;
    body.types = String(data.get("types") || "").split(",").map((t) => t.trim()).filter(Boolean);
    body.status = data.get("status");
    const saved = await guarded(() => api("PUT", `/v1/subscriptions/${sub.id}`, { json: body }));
    if (saved) { say(`Subscription ${saved.name || saved.id} saved.`); render(); }
  } },
    h("h3", {}, `Edit subscription ${sub.name || sub.id}`),
    field("Name", h("input", { name: "name", value: sub.name || "" })),
    field("Event types", h("input", { name: "types", value: (sub.types || []).join(", ") }), "comma-separated; empty: every type"),
    sub.source === "cron" ? h("p", { class: "hint" }, "A cron subscription's filters are its schedule's.") : filter.fields,
    field("Status", h("select", { name: "status" }, ["running", "paused"].map((s) => h("option", { value: s, selected: s === sub.status }, s)))),
    h("button", { type: "submit", class: "primary" }, "Save"), " ",
    link(`#/executions?subscription_id=${sub.id}`, "Its executions"));
  return form;
}

async function subscriptions(selected) {
  const [{ subscriptions: subs }, { functions: fns }] = await Promise.all([
    api("GET", scoped("/v1/subscriptions")), api("GET", scoped("/v1/functions"))]);
  const filter = filterFields("filter");
  const filterBody = filter.body;
  const eventBox = h("textarea", { name: "event", placeholder: '{"specversion": "1.0", "id": "1", "source": "/shop", "type": "order.created", "data": {"total": 120}}' });
  const testVerdict = h("div", { id: "filter-test", role: "status", "aria-live": "polite" });


  async function testFilter() {
    const body = filterBody();
    if (body.error) { testVerdict.textContent = body.error; return; }
    let event = eventBox.value.trim();
    if (!event) {  // no pasted event: the most recent one recorded
      const recent = await api("GET", scoped("/v1/events", { limit: 1 })).catch(() => ({ events: [] }));
      if (!recent.events.length) { testVerdict.textContent = "Paste an event: none was recorded yet."; return; }
      event = JSON.stringify(recent.events[0].event);
      eventBox.value = JSON.stringify(recent.events[0].event, null, 2);
    }
    try { body.event = JSON.parse(event); } catch (err) { testVerdict.textContent = `The event is not JSON: ${err.message}`; return; }
    const answer = await api("POST", "/dashboard/api/filter", { json: body }).catch((err) => ({ valid: false, error: err.message }));
    testVerdict.replaceChildren(!answer.valid ? h("p", { class: "invalid" }, answer.error)
      : answer.matches ? h("p", { class: "valid" }, "The event matches this filter.")
        : h("div", {}, h("p", { class: "invalid" }, "The event does not match:"), h("ul", { class: "reasons" }, answer.reasons.map((r) => h("li", {}, r)))));
  }

  const form = h("form", { class: "panel", id: "subscription-form", onsubmit: async (e) => {
    e.preventDefault();
    const data = new FormData(form);
    const body = filterBody();
    if (body.error) { say(body.error, true); return; }
    body.source = data.get("source");
    body.function_id = data.get("function_id");
    if (data.get("name")) body.name = data.get("name");
    const types = String(data.get("types") || "").split(",").map((t) => t.trim()).filter(Boolean);
    if (types.length) body.types = types;
    const attempts = data.get("max_attempts");
    // Any failure counts as an attempt here (the service default retries errors and timeouts only).
    if (attempts) body.options = { delivery: { max_attempts: Number(attempts), retry_on: ["error", "timeout", "failed"] } };
    const created = await guarded(() => api("POST", "/v1/subscriptions", { json: body }));
    if (created) { say(`Subscription ${created.name || created.id} created.`); render(); }
  } },
    h("h3", {}, "New subscription"),
    field("Name", h("input", { name: "name" })),
    field("Source", h("select", { name: "source" }, ["http", "cron", "swift", "zaqar", "aodh"].map((s) => h("option", { value: s }, s)))),
    field("Event types", h("input", { name: "types", placeholder: "order.created, order.paid" }), "comma-separated; empty: every type"),
    field("Function", h("select", { name: "function_id", required: true }, fns.map((f) => h("option", { value: f.id }, f.name || f.id)))),
    filter.fields,
    field("Attempts before dead letter", h("input", { name: "max_attempts", type: "number", min: 1, max: 20 }), "a failed run counts; empty: the service default"),
    h("button", { type: "submit", class: "primary" }, "Create subscription"),
    h("h4", {}, "Test this filter"),
    field("Event (CloudEvent JSON; empty: the most recent event)", eventBox),
    h("button", { type: "button", onclick: testFilter }, "Test this filter"), testVerdict);

  const out = [h("h2", {}, "Subscriptions"),
    table("Subscriptions", ["name", "source", "types", "filter", "function", "status", ""], subs.map((s) => [
      link(`#/subscriptions/${s.id}`, s.name || shortId(s.id)), s.source, (s.types || []).join(", ") || "any",
      h("code", {}, [Object.keys(s.filters || {}).length ? JSON.stringify(s.filters) : "", s.filter ? pretty(s.filter) : ""].filter(Boolean).join(" AND ") || "—"),
      s.function_id ? link(`#/functions/${s.function_id}`, shortId(s.function_id)) : s.function_alias || "—", badge(s.status),
      h("button", { type: "button", "aria-label": `Delete subscription ${s.name || s.id}`, onclick: async () => {
        if (confirm(`Delete subscription ${s.name || s.id}?`) && await guarded(() => api("DELETE", `/v1/subscriptions/${s.id}`)) !== undefined) render();
      } }, "Delete")]))];
  const current = subs.find((s) => s.id === selected);
  if (current) {
    out.push(editForm(current), h("details", {}, h("summary", {}, "The subscription as stored"), h("pre", {}, pretty(current))));
  } else out.push(form);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Executions with filters; dead letters with replay and discard

async function executions(query) {
  const filters = Object.fromEntries(["status", "function_id", "subscription_id", "event_id"].map((k) => [k, query.get(k) || ""]));
  const rows = (await api("GET", scoped("/v1/executions", filters))).executions;
  const form = h("form", { class: "panel", onsubmit: (e) => {
    e.preventDefault();
    const params = new URLSearchParams([...new FormData(form)].filter(([, v]) => v));
    location.hash = `#/executions?${params}`;
  } },
    field("Status", h("select", { name: "status" }, ["", "success", "failed", "error", "running"].map((s) =>
      h("option", { value: s, selected: s === filters.status }, s || "any")))),
    field("Function id", h("input", { name: "function_id", value: filters.function_id })),
    field("Subscription id", h("input", { name: "subscription_id", value: filters.subscription_id })),
    field("Event id", h("input", { name: "event_id", value: filters.event_id })),
    h("button", { type: "submit" }, "Filter"));
  return [h("h2", {}, "Executions"), form, executionTable(rows)];
}

async function deadLetters() {
  const rows = (await api("GET", scoped("/v1/deadletters"))).deadletters;
  return [h("h2", {}, "Dead letters"),
    table("Dead letters", ["letter", "source", "event", "subscription", "reason", "recorded", "actions"], rows.map((d) => [
      h("code", {}, shortId(d.id)), d.source,
      d.event_id ? link(`#/events/${encodeURIComponent(d.event_id)}`, shortId(d.event_id)) : "—",
      d.subscription_id ? link(`#/subscriptions/${d.subscription_id}`, shortId(d.subscription_id)) : "—",
      d.reason, time(d.created_at),
      h("span", {},
        h("button", { type: "button", "aria-label": `Replay dead letter ${d.id}`, dataset: { action: "replay", letter: d.id }, onclick: async () => {
          const done = await guarded(() => api("POST", `/v1/deadletters/${d.id}/replay`));
          if (done) { say(`Replayed as event ${done.event_id}.`); location.hash = `#/events/${encodeURIComponent(done.event_id)}`; }
        } }, "Replay"), " ",
        h("button", { type: "button", "aria-label": `Discard dead letter ${d.id}`, dataset: { action: "discard", letter: d.id }, onclick: async () => {
          if (confirm("Discard this dead letter?") && await guarded(() => api("DELETE", `/v1/deadletters/${d.id}`)) !== undefined) { say("Discarded."); render(); }
        } }, "Discard"))]))];
}

// ---------------------------------------------------------------------------------------------
// Routing between pages, and the sign-in form

const ROUTES = [
  [/^#\/events\/(.+)$/, (m, q) => eventTrace(decodeURIComponent(m[1]), q), "#/overview"],
  [/^#\/functions\/([^/]+)$/, (m) => functionPage(m[1]), "#/functions"],
  [/^#\/functions$/, () => functions(), "#/functions"],
  [/^#\/subscriptions(?:\/([^/]+))?$/, (m) => subscriptions(m[1]), "#/subscriptions"],
  [/^#\/executions$/, (m, q) => executions(q), "#/executions"],
  [/^#\/deadletters$/, () => deadLetters(), "#/deadletters"],
  [/^#\/overview$/, () => overview(), "#/overview"],
];

async function render() {
  for (const stop of leaving) stop();
  leaving = [];
  const [path, search = ""] = (location.hash || "#/overview").split("?");
  const query = new URLSearchParams(search);
  const route = ROUTES.find(([pattern]) => pattern.test(path)) || ROUTES[ROUTES.length - 1];
  for (const a of document.querySelectorAll("nav a")) {
    a.getAttribute("href") === route[2] ? a.setAttribute("aria-current", "page") : a.removeAttribute("aria-current");
  }
  main.setAttribute("aria-busy", "true");
  try {
    const content = await route[1](path.match(route[0]), query);
    main.replaceChildren(...[content].flat());  // the status line keeps its message until the page changes
  } catch (err) {
    main.replaceChildren(h("h2", {}, "Could not load this page"), h("p", { class: "invalid" }, err.message),
      err.status === 401 ? h("p", {}, "Sign in with a Keystone token above.") : "");
  } finally {
    main.removeAttribute("aria-busy");
  }
}

const login = document.getElementById("login");
login.token.value = session.token;
login.project.value = session.project;
login.addEventListener("submit", (e) => {
  e.preventDefault();
  session.set(login.token.value.trim(), login.project.value.trim());
  say(session.token ? "Token set: the API shows what it allows." : "No token: auth off.");
  render();
});
window.addEventListener("hashchange", () => { say(""); render(); main.focus(); });
render();
