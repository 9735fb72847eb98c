// portrouter's dashboard: the state arrives from /_api/events (server-sent
// events) and is drawn into the page; no framework, no build step, nothing
// fetched from anywhere but the router itself.
"use strict";

const HISTORY = 60;  // seconds each sparkline shows

const model = {
  routes: [],
  traffic: {},     // route key -> counters (totals and rates)
  services: {},    // name -> state
  spark: {},       // route key -> bytes moved in each of the last HISTORY seconds
  shifted: {},     // route key -> the total when the sparkline last moved on
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function cell(label, content, attrs) {
  return el("td", Object.assign({"data-label": label}, attrs || {}), el("span", {}, content));
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function ago(seconds) {
  if (seconds < 60) return Math.round(seconds) + " s ago";
  if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function replaceRows(section, rows) {
  const body = document.querySelector(`#${section} tbody`);
  body.replaceChildren(...rows);
}

// -- the routing table --------------------------------------------------------

function proxyText(row) {
  const parts = [];
  if (row.proxy_protocol) parts.push("from " + row.proxy_protocol.trusted.join(", "));
  if (row.send_proxy) parts.push("sends " + row.send_proxy);
  return parts.join("; ") || "-";
}

function drawRoutes() {
  replaceRows("routes", model.routes.map((row) => {
    let project = row.project || "-";
    if (row.service) project += "/" + row.service;
    let backend = row.backend;
    if (row.path) backend += " (path " + row.path + ")";
    return el("tr", {"data-key": row.key || ""},
      cell("Port", row.port === null ? "-" : row.port, {className: "num"}),
      cell("Protocol", row.protocol),
      cell("Project", project, {className: "project"}),
      cell("Backend", backend),
      cell("Hostnames", (row.hostnames || []).join(", ") || "-"),
      cell("TLS", row.tls ? "yes" : "no"),
      cell("PROXY", proxyText(row)));
  }));
}

// -- traffic ------------------------------------------------------------------------

function trafficKeys() {
  const keys = [];
  for (const row of model.routes) {
    if (row.key && !keys.includes(row.key) && model.traffic[row.key]) keys.push(row.key);
  }
  for (const key of Object.keys(model.traffic)) if (!keys.includes(key)) keys.push(key);
  return keys;
}

function number(label, value, text, extra) {
  return cell(label, text === undefined ? value : text,
              Object.assign({className: "num " + (extra || ""), "data-value": value}, {}));
}

function drawTraffic() {
  replaceRows("traffic", trafficKeys().map((key) => {
    const t = model.traffic[key];
    const open = t.udp_sessions === undefined ? t.open : `${t.open} (${t.udp_sessions} UDP)`;
    const e = t.errors;
    const errors = ["502", "504", "refused", "limit"].map((name, i) =>
      number(["502", "504", "Refused", "At limit"][i], e[name], undefined,
             "err err-" + name + (e[name] ? " nonzero" : "")));
    const canvas = el("canvas", {className: "spark", width: 120, height: 24, "aria-label": "last minute"});
    const row = el("tr", {"data-key": key},
      cell("Route", key, {className: "project"}),
      number("Open", t.open, open, "open"),
      number("Requests", t.requests, undefined, "requests"),
      number("In", t.bytes_in, bytes(t.bytes_in), "bytes_in"),
      number("Out", t.bytes_out, bytes(t.bytes_out), "bytes_out"),
      number("In /s", t.rate_in, bytes(t.rate_in) + "/s", "rate_in"),
      number("Out /s", t.rate_out, bytes(t.rate_out) + "/s", "rate_out"),
      ...errors,
      el("td", {"data-label": "Last minute"}, canvas));
    spark(canvas, model.spark[key] || []);
    return row;
  }));
}

function spark(canvas, values) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#d9dde5";  // the minute's baseline, so a short history reads as recent
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(1, h - 1.5);
  ctx.lineTo(w - 1, h - 1.5);
  ctx.stroke();
  ctx.strokeStyle = "#2f6fde";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  const start = HISTORY - values.length;
  values.forEach((v, i) => {
    const x = ((start + i) / (HISTORY - 1)) * (w - 2) + 1;
    const y = h - 2 - (v / max) * (h - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function total(t) { return t.bytes_in + t.bytes_out; }

// Once a second every sparkline moves on by what its route moved since.
function shiftSparklines() {
  for (const [key, t] of Object.entries(model.traffic)) {
    const now = total(t);
    const line = model.spark[key] || (model.spark[key] = []);
    line.push(Math.max(0, now - (model.shifted[key] ?? now)));
    model.shifted[key] = now;
    if (line.length > HISTORY) line.splice(0, line.length - HISTORY);
  }
  document.querySelectorAll("#traffic tr[data-key]").forEach((row) => {
    const canvas = row.querySelector("canvas");
    if (canvas) spark(canvas, model.spark[row.dataset.key] || []);
  });
}

// -- services -----------------------------------------------------------------------

function drawServices() {
  const names = Object.keys(model.services).sort();
  document.querySelector("#services .empty").hidden = names.length > 0;
  replaceRows("services", names.map((name) => {
    const s = model.services[name];
    return el("tr", {"data-service": name},
      cell("Service", name, {className: "project"}),
      cell("State", s.state, {className: "state state-" + s.state}),
      cell("Last reason", s.state === "failed" && s.reason ? s.reason : "-", {className: "reason"}),
      cell("Start took", s.start_took === null ? "-" : s.start_took.toFixed(2) + " s", {className: "num took"}),
      cell("Starts", s.starts, {className: "num"}),
      cell("Command", s.command));
  }));
}

// -- log ------------------------------------------------------------------------------

function addLines(lines, replace) {
  const box = document.querySelector("#log .lines");
  const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const nodes = lines.map((line) => {
    const when = new Date(line.time * 1000).toISOString().slice(11, 19);
    return el("div", {className: line.level}, `${when} [${line.namespace}] ${line.text}`);
  });
  if (replace) box.replaceChildren(...nodes); else box.append(...nodes);
  while (box.childElementCount > 100) box.firstElementChild.remove();
  if (atBottom || replace) box.scrollTop = box.scrollHeight;
}

// -- cluster nodes (GET /_api/nodes; 404 when there is no cluster) ---------------------

let nodesTimer = null;

async function loadNodes() {
  const section = document.getElementById("nodes");
  let answer;
  try {
    answer = await fetch("/_api/nodes", {credentials: "same-origin", headers: {"Accept": "application/json"}});
  } catch (e) {
    return;  // the router is away: the event stream says so
  }
  if (!answer.ok) {
    section.hidden = true;
    return;
  }
  const data = await answer.json();
  section.hidden = false;
  replaceRows("nodes", (data.nodes || []).map((n) => el("tr", {"data-node": n.node},
    cell("Node", n.node),
    cell("Version", n.version),
    cell("Table version", n.table_version, {className: "num"}),
    // Seconds since the node's last heartbeat, as the router that answers saw it (not a clock time).
    cell("Last seen", typeof n.last_seen === "number" ? ago(Math.max(0, n.last_seen)) : n.last_seen),
    cell("Failed", (n.failed || []).map((f) => `${f.project}: ${f.reason}`).join("; ") || "-"))));
  if (nodesTimer === null) nodesTimer = setInterval(loadNodes, 5000);
}

// -- the event stream -------------------------------------------------------------------

function status(text, kind) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = "status " + (kind || "");
}

function applyState(data) {
  model.routes = data.routes;
  model.traffic = data.traffic;
  model.services = data.services;
  model.spark = {};
  model.shifted = {};
  for (const [key, line] of Object.entries(data.history || {})) model.spark[key] = line.slice(-HISTORY);
  for (const [key, t] of Object.entries(model.traffic)) model.shifted[key] = total(t);
  drawRoutes();
  drawTraffic();
  drawServices();
  addLines(data.log, true);
  if (data.cluster) loadNodes();
}

function connect() {
  const events = new EventSource("/_api/events");
  events.onopen = () => status("live", "live");
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) {
      status("disconnected: reload the page (with ?token= if the router asks for one)", "down");
    } else {
      status("reconnecting…", "down");
    }
  };
  events.addEventListener("state", (e) => applyState(JSON.parse(e.data)));
  events.addEventListener("routes", (e) => {
    model.routes = JSON.parse(e.data).routes;
    drawRoutes();
    drawTraffic();
  });
  events.addEventListener("traffic", (e) => {
    const data = JSON.parse(e.data);
    for (const key of data.gone) { delete model.traffic[key]; delete model.spark[key]; delete model.shifted[key]; }
    for (const [key, t] of Object.entries(data.routes)) {
      if (!(key in model.shifted)) model.shifted[key] = total(t);
      model.traffic[key] = t;
    }
    drawTraffic();
  });
  events.addEventListener("services", (e) => {
    const data = JSON.parse(e.data);
    for (const name of data.gone) delete model.services[name];
    Object.assign(model.services, data.services);
    drawServices();
  });
  events.addEventListener("log", (e) => addLines(JSON.parse(e.data).lines, false));
  events.addEventListener("dropped", (e) => {
    const n = JSON.parse(e.data).dropped;
    addLines([{time: Date.now() / 1000, level: "warn", namespace: "dashboard",
               text: `${n} updates were dropped while this page did not keep up; the whole state follows`}], false);
  });
}

connect();
loadNodes();
setInterval(shiftSparklines, 1000);
