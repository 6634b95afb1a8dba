// Talks to Headwater's API as the signed-in user: every request carries X-Auth-Token when one is
// set, and the API decides what the user's project may see (the dashboard never filters for it).

const TOKEN = "headwater.token";
const PROJECT = "headwater.project";

export const session = {
  get token() { return sessionStorage.getItem(TOKEN) || ""; },
  get project() { return sessionStorage.getItem(PROJECT) || ""; },
  set(token, project) {
    token ? sessionStorage.setItem(TOKEN, token) : sessionStorage.removeItem(TOKEN);
    project ? sessionStorage.setItem(PROJECT, project) : sessionStorage.removeItem(PROJECT);
  },
};

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  if (session.token) out["X-Auth-Token"] = session.token;
  return out;
}

// A list's URL with the chosen project (admins switching project; the API ignores it for others).
export function scoped(path, query = {}) {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") params.set(k, v);
  if (session.project) params.set("project_id", session.project);
  const text = params.toString();
  return text ? `${path}${path.includes("?") ? "&" : "?"}${text}` : path;
}

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export async function api(method, path, { json, form, text } = {}) {
  const init = { method, headers: headers() };
  if (json !== undefined) { init.body = JSON.stringify(json); init.headers["Content-Type"] = "application/json"; }
  if (form !== undefined) init.body = form;
  const resp = await fetch(path, init);
  if (resp.status === 204) return null;
  const body = text ? await resp.text() : await resp.json().catch(() => null);
  if (!resp.ok) {
    const message = (body && body.faultstring) || (typeof body === "string" && body) || resp.statusText;
    throw new ApiError(resp.status, `${resp.status}: ${message}`);
  }
  return body;
}

// Server-sent events read with fetch (EventSource cannot send X-Auth-Token): calls onOpen() once
// the server watches for us, then onMessage(kind, data) per message until `signal` aborts.
export async function stream(path, onMessage, signal, onOpen = () => {}) {
  const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!resp.ok) {
    const body = await resp.json().catch(() => null);
    throw new ApiError(resp.status, `${resp.status}: ${(body && body.faultstring) || "the event tail is not available"}`);
  }
  onOpen();
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onMessage(kind, JSON.parse(data));
    }
  }
}
