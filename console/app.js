// The operator console: a small single-page app over the public HTTP API. The token lives in
// session storage only. Every text from the API goes into the page as text (never as HTML),
// so payloads, headers and names cannot inject markup.

const API = "/api/v1/mq";
const TOKEN_KEY = "mq.console.token";
const REFRESH_MS = 2000;
const HISTORY = 30;

const view = document.getElementById("view");
const notice = document.getElementById("notice");
let refreshTimer = null;
// A notice to show on the next page (the one a sign-out leads to).
let carried = null;
// Message counts seen per queue, for the small live charts.
const history = new Map();

// ---- DOM and formatting helpers -----------------------------------------------------------

function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function say(text, kind = "ok") {
  notice.replaceChildren(h("p", { class: kind }, text));
}

function number(value) {
  return typeof value === "number" ? value.toLocaleString("en-US", { maximumFractionDigits: 2 }) : "—";
}

function when(value) {
  return value ? new Date(value).toLocaleString() : "—";
}

function statusText(status) {
  return h("span", { class: `status-${status}` }, status);
}

function table(caption, headings, rows, empty) {
  if (rows.length === 0) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, headings.map((heading) =>
      h("th", { scope: "col", class: heading.numeric ? "num" : undefined }, heading.text ?? heading)))),
    h("tbody", {}, rows));
}

function sparkline(values, label) {
  const width = 120, height = 28;
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}

// ---- API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body?.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = body?.code;
  }
}

async function api(method, path, body) {
  const headers = { authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) ?? ""}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path.startsWith("/") ? path : `${API}/${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (response.status === 401) {
    signOut("Your token was refused or has expired: sign in again.");
    throw new ApiError(401, data);
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

const enc = encodeURIComponent;

// ---- Sign-in ------------------------------------------------------------------------------

function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part));
  } catch {
    return null;
  }
}

function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  notice.replaceChildren();
  go("#/queues");
}

// Shows `hash`: a change of hash renders through the hashchange event, the same one here.
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopRefresh();
  carried = message ?? null;
  go("#/sign-in");
}

async function signInPage() {
  const tokenField = h("textarea", { id: "token", name: "token", required: true, rows: 4, autocomplete: "off" });
  const form = h("form", {
    onsubmit: (event) => {
      event.preventDefault();
      const token = tokenField.value.trim();
      if (!claims(token)?.tenant_id) {
        say("That is not a JWT with a tenant_id claim.", "error");
        tokenField.focus();
        return;
      }
      signIn(token);
    },
  },
  h("label", { for: "token" }, "JWT (kept in this tab's session storage only)"),
  tokenField,
  h("p", {}, h("button", { type: "submit", class: "primary" }, "Sign in")));
  const page = [h("h1", {}, "Sign in"), form];
  const status = await fetch(`${API}/status`).then((r) => r.json()).catch(() => null);
  if (status?.limits?.devMode) {
    const tenantField = h("input", { id: "dev-tenant", name: "tenant", value: crypto.randomUUID(), size: 40 });
    page.push(h("h2", {}, "Development mode"),
      h("form", {
        class: "inline",
        onsubmit: async (event) => {
          event.preventDefault();
          const response = await fetch("/console/dev-token", {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify({ tenantId: tenantField.value.trim(), sub: "console" }),
          });
          const body = await response.json();
          if (!response.ok) return say(body.message, "error");
          signIn(body.token);
        },
      },
      h("div", {}, h("label", { for: "dev-tenant" }, "Tenant id"), tenantField),
      h("button", { type: "submit" }, "Mint a development token")));
  }
  return page;
}

// ---- Queues -------------------------------------------------------------------------------

// Lists show the first PAGE items; their captions say when there are more.
const PAGE = 500;

function counted(total, shown, noun) {
  return shown < total ? `${total} ${noun}, the first ${shown} shown` : `${total} ${noun}`;
}

async function queuesPage() {
  const [queues, topics] = await Promise.all([api("GET", `queues?limit=${PAGE}`), api("GET", "metrics/topics")]);
  const metrics = new Map(topics.topics.map((t) => [t.name, t]));
  const rows = queues.items.map((queue) => {
    const m = metrics.get(queue.name) ?? {};
    const seen = history.get(queue.name) ?? [];
    seen.push(m.messageCount ?? 0);
    if (seen.length > HISTORY) seen.shift();
    history.set(queue.name, seen);
    return h("tr", { "data-queue": queue.name },
      h("th", { scope: "row" }, h("a", { href: `#/queues/${enc(queue.name)}` }, queue.name)),
      h("td", { class: "num", "data-field": "messages" }, number(m.messageCount)),
      h("td", { class: "num" }, number(m.lag)),
      h("td", { class: "num" }, number(m.delayedCount)),
      h("td", { class: "num" }, number(m.publishRate)),
      h("td", { class: "num" }, number(m.consumeRate)),
      h("td", {}, statusText(queue.status)),
      h("td", {}, sparkline(seen, `messages in ${queue.name} over the last ${seen.length} looks`)));
  });
  const name = h("input", { id: "new-queue", name: "name", required: true, pattern: "[A-Za-z0-9._\\-]{1,200}" });
  return [
    h("h1", {}, "Queues"),
    table(`${counted(queues.total, queues.items.length, "queues")}; refreshed every ${REFRESH_MS / 1000} s`,
      ["Name", { text: "Messages", numeric: true }, { text: "Lag", numeric: true }, { text: "Delayed", numeric: true },
        { text: "Publish/s", numeric: true }, { text: "Consume/s", numeric: true }, "Status", "Messages over time"],
      rows, "No queues yet."),
    h("h2", {}, "Create a queue"),
    h("form", {
      class: "inline",
      onsubmit: async (event) => {
        event.preventDefault();
        const created = name.value.trim();
        await act(() => api("POST", "queues", { name: created }), `Queue ${created} created.`, event.target);
      },
    }, h("div", {}, h("label", { for: "new-queue" }, "Name"), name), h("button", { type: "submit", class: "primary", "data-key": "create-queue" }, "Create")),
  ];
}

async function queuePage(name) {
  const [queue, subscribers, messages] = await Promise.all([
    api("GET", `queues/${enc(name)}`),
    api("GET", `queues/${enc(name)}/subscribers`),
    // Browsing takes the consumer ACL: a producer-only principal still sees the rest.
    api("GET", `queues/${enc(name)}/messages?limit=25`).catch((error) => error),
  ]);
  const settings = ["topicType", "partitionCount", "retentionMs", "maxLength", "messageFormat", "compressionType",
    "encrypted", "isPublic", "allowedProducers", "allowedConsumers", "status", "createdAt"];
  const stats = queue.stats;
  const payload = h("textarea", { id: "payload", name: "payload" }, '{"hello": "world"}');
  const key = h("input", { id: "key", name: "key" });
  return [
    h("h1", {}, `Queue ${queue.name}`),
    h("h2", {}, "Stats"),
    h("dl", { class: "settings", id: "stats" },
      Object.entries(stats).flatMap(([field, value]) => [h("dt", {}, field), h("dd", { "data-stat": field }, number(value))])),
    h("h2", {}, "Settings"),
    h("dl", { class: "settings" }, settings.flatMap((field) => {
      const value = queue[field];
      return [h("dt", {}, field), h("dd", {}, Array.isArray(value) ? value.join(", ") || "anyone" : String(value))];
    })),
    h("h2", {}, "Subscriptions"),
    table(`${subscribers.total} subscriptions`, ["Group", "Consumer", "Type", "Status", { text: "Lag", numeric: true },
      { text: "Pending", numeric: true }, "Tenant"],
      subscribers.items.map((s) => h("tr", {},
        h("td", {}, s.consumerGroup), h("td", {}, s.consumerName), h("td", {}, s.subscriptionType),
        h("td", {}, statusText(s.status)), h("td", { class: "num" }, number(s.lag)), h("td", { class: "num" }, number(s.pending)),
        h("td", {}, s.guest ? `guest ${s.tenantId}` : "this tenant"))),
      "No subscriptions."),
    h("h2", {}, "Publish a test message"),
    h("form", {
      onsubmit: async (event) => {
        event.preventDefault();
        let body;
        try {
          body = { queue: name, payload: JSON.parse(payload.value) };
        } catch (error) {
          say(`The payload is not JSON: ${error.message}`, "error");
          return payload.focus();
        }
        if (key.value.trim()) body.key = key.value.trim();
        await act(async () => {
          const result = await api("POST", "publish", body);
          return `Published ${result.messageId} to partition ${result.partition}.`;
        }, undefined, event.target);
      },
    },
    h("label", { for: "payload" }, "Payload (JSON)"), payload,
    h("label", { for: "key" }, "Key (optional)"), key,
    h("p", {}, h("button", { type: "submit", class: "primary", "data-key": "publish" }, "Publish"))),
    h("h2", {}, "Messages"),
    messages instanceof Error ? h("p", { class: "muted" }, `Not shown: ${messages.message}`) : [
      messageTable(name, messages, false),
      h("p", {}, h("a", { href: `#/queues/${enc(name)}/messages` }, "Browse all messages")),
    ],
  ];
}

// The queue's recorded messages (newest first); with `selectable`, checkboxes for redrive.
function messageTable(queue, page, selectable) {
  return table("Newest first, as recorded (about a second after publishing); browsing consumes nothing",
    [selectable ? "Select" : null, "Message", "Status", "Published", "Key", selectable ? "Reason" : "Partition"].filter(Boolean),
    page.items.map((m) => h("tr", { "data-message": m.messageId },
      selectable ? h("td", {}, h("input", {
        type: "checkbox", name: "message", value: m.messageId, disabled: m.status === "redriven",
        "aria-label": `select ${m.messageId}`,
      })) : null,
      h("th", { scope: "row" }, h("a", { href: `#/messages/${enc(queue)}/${enc(m.messageId)}` }, m.messageId)),
      h("td", {}, statusText(m.status)),
      h("td", {}, when(m.publishedAt)),
      h("td", {}, m.key ?? "—"),
      h("td", {}, selectable ? (m.headers["x-dead-letter-reason"] ?? "—") : String(m.partition)))),
    "No messages recorded.");
}

// ---- A message ----------------------------------------------------------------------------

async function messagePage(queue, id) {
  const message = await api("GET", `messages/${enc(id)}?queue=${enc(queue)}`);
  const headers = Object.entries(message.headers ?? {});
  return [
    h("h1", {}, `Message ${message.messageId}`),
    h("p", {}, "In queue ", h("a", { href: `#/queues/${enc(queue)}` }, queue), "; status ", statusText(message.status), "."),
    h("dl", { class: "settings" },
      [["partition", message.partition], ["offset", message.offset], ["key", message.key], ["correlationId", message.correlationId],
        ["publishedAt", when(message.publishedAt)], ["expiresAt", when(message.expiresAt)], ["traceId", message.traceId],
        ["retryCount", message.retryCount]]
        .flatMap(([field, value]) => [h("dt", {}, field), h("dd", {}, value ?? "—")])),
    h("h2", {}, "Payload"),
    message.payloadError ? h("p", { class: "muted" }, `Not shown: ${message.payloadError}`) : null,
    h("pre", { id: "payload" }, JSON.stringify(message.payload, null, 2)),
    h("h2", {}, "Headers"),
    table("Headers", ["Name", "Value"], headers.map(([name, value]) => h("tr", {}, h("th", { scope: "row" }, name), h("td", {}, value))),
      "No headers."),
    h("h2", {}, "Delivery attempts"),
    table("Every attempt, oldest first", ["Subscription", { text: "Attempt", numeric: true }, "Status", { text: "Took (ms)", numeric: true }, "Error", "At"],
      message.deliveries.map((d) => h("tr", {},
        h("td", {}, d.subscriptionId), h("td", { class: "num" }, d.attempt), h("td", {}, statusText(d.status)),
        h("td", { class: "num" }, number(d.processingMs)), h("td", {}, d.error ?? "—"), h("td", {}, when(d.at)))),
      "No delivery attempts yet."),
  ];
}

// ---- Dead letters -------------------------------------------------------------------------

async function deadLettersPage() {
  const [queues, subscriptions, topics] = await Promise.all([
    api("GET", `queues?limit=${PAGE}`), api("GET", `subscriptions?limit=${PAGE}`), api("GET", "metrics/topics"),
  ]);
  const metrics = new Map(topics.topics.map((t) => [t.name, t]));
  // Every subscription's dead-letter queue that exists, and any other queue named *.dlq.
  const named = new Set(subscriptions.items.map((s) => s.deadLetterQueue));
  const dead = queues.items.filter((q) => named.has(q.name) || q.name.endsWith(".dlq"));
  return [
    h("h1", {}, "Dead letters"),
    h("p", {}, "Messages whose retries ran out land in the subscription's dead-letter queue (by default <queue>.dlq)."),
    table("Dead-letter queues", ["Queue", { text: "Messages", numeric: true }],
      dead.map((q) => h("tr", {},
        h("th", { scope: "row" }, h("a", { href: `#/queues/${enc(q.name)}/messages` }, q.name)),
        h("td", { class: "num" }, number(metrics.get(q.name)?.messageCount)))),
      "No dead-letter queues: nothing has been dead-lettered."),
    queues.items.length < queues.total ? h("p", { class: "muted" }, `Only the first ${PAGE} of ${queues.total} queues were looked at.`) : null,
  ];
}

// Every recorded message of a queue, page by page; selected ones can be redriven (only a
// dead letter goes, the others come back with the reason).
async function browserPage(name) {
  const first = await api("GET", `queues/${enc(name)}/messages?limit=100`);
  const page = { items: [...first.items], next: first.next };
  const rows = messageTable(name, page, true);
  const older = h("button", {
    type: "button",
    onclick: async () => {
      try {
        const more = await api("GET", `queues/${enc(name)}/messages?limit=100&before=${enc(page.next)}`);
        page.next = more.next;
        const added = messageTable(name, more, true).querySelector("tbody");
        rows.querySelector("tbody")?.append(...added.children);
        older.hidden = !page.next;
      } catch (error) {
        if (error.status !== 401) say(error.message, "error");
      }
    },
  }, "Show older messages");
  older.hidden = !page.next;
  const form = h("form", {
    onsubmit: async (event) => {
      event.preventDefault();
      const ids = [...form.querySelectorAll("input[name=message]:checked")].map((box) => box.value);
      if (ids.length === 0) return say("Select at least one message to redrive.", "error");
      await act(async () => {
        const result = await api("POST", `queues/${enc(name)}/redrive`, { messageIds: ids });
        const failed = result.failed.map((f) => f.message).join("; ");
        return `${result.redriven.length} redriven` + (failed ? `; not redriven: ${failed}` : ".");
      });
    },
  },
  rows,
  h("p", { class: "actions" }, older, h("button", { type: "submit", class: "primary" }, "Redrive selected")));
  return [
    h("h1", {}, `Messages in ${name}`),
    h("p", {}, "Redrive publishes the selected dead letters again to the queue they came from and marks them redriven here."),
    form,
  ];
}

// ---- Subscriptions ------------------------------------------------------------------------

async function subscriptionsPage() {
  const [subscriptions, consumers] = await Promise.all([api("GET", `subscriptions?limit=${PAGE}`), api("GET", "metrics/consumers")]);
  const metrics = new Map(consumers.consumers.map((c) => [c.subscriptionId, c]));
  const rows = subscriptions.items.map((s) => {
    const m = metrics.get(s.id) ?? {};
    const paused = s.status === "paused";
    return h("tr", { "data-subscription": s.id },
      h("th", { scope: "row" }, `${s.consumerGroup} / ${s.consumerName}`),
      h("td", {}, h("a", { href: `#/queues/${enc(s.queue)}` }, s.queue)),
      h("td", {}, s.subscriptionType),
      h("td", { "data-field": "status" }, statusText(s.status)),
      h("td", { class: "num" }, number(m.lag)),
      h("td", { class: "num" }, number(m.pending)),
      h("td", { class: "num" }, number(m.processingRate)),
      h("td", { class: "num" }, number(m.errorRate)),
      h("td", {}, h("div", { class: "actions" },
        h("button", {
          type: "button",
          "aria-label": `${paused ? "Resume" : "Pause"} ${s.consumerGroup} / ${s.consumerName}`,
          "data-key": `toggle-${s.id}`,
          onclick: () => act(() => api("POST", `subscriptions/${s.id}/${paused ? "resume" : "pause"}`),
            `${s.consumerGroup} / ${s.consumerName} ${paused ? "resumed" : "paused"}.`),
        }, paused ? "Resume" : "Pause"),
        h("button", {
          type: "button", class: "danger",
          "aria-label": `Delete ${s.consumerGroup} / ${s.consumerName}`,
          "data-key": `delete-${s.id}`,
          onclick: () => confirm(`Delete the subscription ${s.consumerGroup} / ${s.consumerName}?`) &&
            act(() => api("DELETE", `subscriptions/${s.id}`), "Subscription deleted."),
        }, "Delete"))));
  });
  return [
    h("h1", {}, "Subscriptions"),
    table(counted(subscriptions.total, subscriptions.items.length, "subscriptions"), ["Group / consumer", "Queue", "Type", "Status", { text: "Lag", numeric: true },
      { text: "Pending", numeric: true }, { text: "Processed/s", numeric: true }, { text: "Errors/s", numeric: true }, "Actions"],
    rows, "No subscriptions yet."),
  ];
}

// ---- Routing ------------------------------------------------------------------------------

// Runs an action, says how it went, and redraws the page; a form it came from is reset.
async function act(action, success, form) {
  try {
    const result = await action();
    say(typeof result === "string" ? result : success);
  } catch (error) {
    if (error.status !== 401) say(error.message, "error");
    return;
  }
  form?.reset();
  await render(false, true);
}

function stopRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
}

// What identifies a focusable element across a redraw.
function focusKey(element) {
  return element?.dataset?.key || element?.id || element?.getAttribute?.("href") || null;
}

// Whether the user is in the middle of something a redraw would undo: typing, or a form
// holding what they typed.
function busy() {
  const active = document.activeElement;
  if (view.contains(active) && active.matches("input, textarea, select")) return true;
  return [...view.querySelectorAll("input, textarea")].some((field) =>
    field.type === "checkbox" ? field.checked !== field.defaultChecked : field.value !== field.defaultValue);
}

const routes = [
  [/^#\/queues$/, queuesPage, true],
  [/^#\/queues\/([^/]+)$/, queuePage, true],
  [/^#\/messages\/([^/]+)\/([^/]+)$/, messagePage, false],
  [/^#\/dead-letters$/, deadLettersPage, false],
  [/^#\/queues\/([^/]+)\/messages$/, browserPage, false],
  [/^#\/subscriptions$/, subscriptionsPage, false],
];

// Each render has a number; one that finishes after a newer one began is thrown away.
let renders = 0;

// Draws the page the hash names. `moveFocus`: a navigation (focus to the new heading);
// `forced`: after an action of the user's, drawn even over a form in progress.
async function render(moveFocus, forced = false) {
  stopRefresh();
  const number = ++renders;
  const signedIn = Boolean(sessionStorage.getItem(TOKEN_KEY));
  document.getElementById("nav").hidden = !signedIn;
  if (!signedIn) {
    const content = await signInPage();
    if (number !== renders) return;
    view.replaceChildren(...content);
    if (moveFocus) view.focus();
    return;
  }
  const token = claims(sessionStorage.getItem(TOKEN_KEY));
  document.getElementById("who").textContent = `${token?.sub ?? "?"} of tenant ${token?.tenant_id ?? "?"}`;
  const hash = location.hash;
  const found = routes.find(([pattern]) => pattern.test(hash));
  if (!found) {
    location.hash = "#/queues";
    return;
  }
  const [pattern, page, live] = found;
  for (const link of document.querySelectorAll("nav a")) {
    if (hash.startsWith(link.getAttribute("href"))) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const again = () => {
    if (live && number === renders) refreshTimer = setTimeout(() => render(false), REFRESH_MS);
  };
  let content;
  try {
    const args = hash.match(pattern).slice(1).map(decodeURIComponent);
    content = await page(...args);
  } catch (error) {
    if (error.status === 401 || number !== renders) return;
    content = [h("h1", {}, "Not available"), h("p", { class: "error" }, error.message)];
  }
  if (number !== renders) return;
  if (!moveFocus && !forced && busy()) return again();
  const focused = view.contains(document.activeElement) ? focusKey(document.activeElement) : null;
  view.replaceChildren(...content.flat().filter(Boolean));
  if (moveFocus) {
    // A screen reader announces the new page's heading; the keyboard continues from it.
    const heading = view.querySelector("h1");
    heading?.setAttribute("tabindex", "-1");
    heading?.focus();
  } else if (focused) {
    // A refresh leaves the keyboard where it was.
    [...view.querySelectorAll("a, button, input, textarea")].find((e) => focusKey(e) === focused)?.focus();
  }
  again();
}

// `moveFocus`: after a navigation, focus goes to the new page's heading; on the first load
// it stays at the top, where the skip link is the first stop.
function route(moveFocus = true) {
  notice.replaceChildren();
  if (carried) say(carried, "error");
  carried = null;
  render(moveFocus);
}

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", () => route(true));
route(false);
