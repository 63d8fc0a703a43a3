// paystream dashboard: one feed, a snapshot per second, no dependencies.
"use strict";

let history = [];  // {at, processed, stored, kept}: the server's, then one point a snapshot
const WINDOW_S = 600;
let canReplay = false;

const $ = (id) => document.getElementById(id);
const sum = (object) => Object.values(object || {}).reduce((a, b) => a + b, 0);
const fmt = (n) => Math.round(n).toLocaleString("en-US");

function text(id, value) { $(id).textContent = value; }

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return Math.round(seconds / 86400) + " d";
}

function badge(id, ok, label) {
  const el = $(id);
  el.className = "badge " + (ok === true ? "ok" : ok === false ? "bad" : "warn");
  el.textContent = label;
}

function cell(row, value, className) {
  const td = row.insertCell();
  td.textContent = value;
  if (className) td.className = className;
  return td;
}

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  canvas.width = canvas.clientWidth * ratio;  // draw at the displayed size, not stretched
  canvas.height = canvas.clientHeight * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  const w = canvas.clientWidth, h = canvas.clientHeight;
  ctx.clearRect(0, 0, w, h);
  const rates = [];
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i], dt = Math.max(b.at - a.at, 0.001);
    rates.push({ at: b.at, processed: (b.processed - a.processed) / dt,
                 stored: (b.stored - a.stored) / dt, kept: (b.kept - a.kept) / dt });
  }
  const max = Math.max(10, ...rates.map((r) => r.processed));
  ctx.strokeStyle = "#26323d"; ctx.fillStyle = "#7d8b99"; ctx.font = "11px system-ui";
  for (let i = 0; i <= 4; i++) {
    const y = h - 16 - (h - 30) * i / 4;
    ctx.beginPath(); ctx.moveTo(40, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(fmt(max * i / 4), 2, y + 4);
  }
  const now = Date.now() / 1000;
  const x = (at) => 40 + (w - 40) * (1 - (now - at) / WINDOW_S);
  const y = (v) => h - 16 - (h - 30) * v / max;
  for (const [key, colour] of [["processed", "#4c9be8"], ["stored", "#3fb27f"], ["kept", "#e0a43a"]]) {
    ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.beginPath();
    rates.forEach((r, i) => (i ? ctx.lineTo(x(r.at), y(r[key])) : ctx.moveTo(x(r.at), y(r[key]))));
    ctx.stroke();
  }
}

function render(s) {
  text("group", "group " + s.group);
  if (s.health) {  // absent from a snapshot made before this page was watching
    badge("health-database", s.health.database, "database " + (s.health.database ? "ready" : "down"));
    badge("health-broker", s.health.broker, "broker " + (s.health.broker ? "ready" : "down"));
  }
  badge("circuit", s.circuit === "closed" ? true : s.circuit === "open" ? false : null,
        "gateway circuit " + s.circuit);
  // Partitions whose intake has stalled: the record that blocks each, the error, how long.
  const stalls = $("stalls");
  stalls.hidden = !(s.stalls && s.stalls.length);
  stalls.replaceChildren(...(s.stalls || []).map((st) => {
    const line = document.createElement("div");
    line.textContent = "intake stalled at " + st.partition + " for " + age(st.seconds) +
      ", blocked by record " + st.record + ": " + st.error;
    return line;
  }));
  const processed = s.processed, stored = s.stored, kept = sum(s.kept);
  const lag = sum(s.lag);
  text("t-records", fmt(processed));
  text("t-stored", fmt(stored));
  text("t-kept", fmt(kept));
  text("t-reported", fmt((s.reports || {}).delivered || 0));
  text("t-outbox", s.database.available ? fmt(s.database.outbox_depth) : "db down");
  text("t-lag", fmt(lag));

  if (s.history) history = s.history;  // the first snapshot: the last minutes, served
  else history.push({ at: s.at, processed, stored, kept });
  while (history.length && history[0].at < s.at - WINDOW_S) history.shift();
  drawChart();

  const lagBox = $("lag");
  lagBox.replaceChildren();
  const maxLag = Math.max(1, ...Object.values(s.lag));
  for (const [name, n] of Object.entries(s.lag).sort()) {
    const bar = document.createElement("div"); bar.className = "bar";
    const label = document.createElement("span"); label.className = "name"; label.textContent = name;
    const track = document.createElement("span"); track.className = "track";
    const fill = document.createElement("span"); fill.className = "fill";
    fill.style.width = (100 * n / maxLag) + "%"; fill.style.display = "block";
    track.appendChild(fill);
    const count = document.createElement("span"); count.className = "n"; count.textContent = fmt(n);
    bar.append(label, track, count); lagBox.appendChild(bar);
  }

  const keptBody = $("kept").tBodies[0];
  keptBody.replaceChildren();
  let waitingAmount = 0, waitingCount = 0, waitingOldest = null;
  for (const k of s.database.kept || []) {
    const row = keptBody.insertRow();
    if (k.waits && k.unresolved) row.className = "waits";
    cell(row, k.reason); cell(row, k.error_type, "type-" + k.error_type);
    cell(row, fmt(k.count), "num"); cell(row, fmt(k.resolved), "num");
    cell(row, fmt(k.unresolved), "num"); cell(row, fmt(k.unresolved_amount), "num");
    cell(row, age(k.oldest_unresolved_s), "num");
    if (k.waits && k.unresolved) {
      waitingAmount += k.unresolved_amount; waitingCount += k.unresolved;
      waitingOldest = Math.max(waitingOldest || 0, k.oldest_unresolved_s || 0);
    }
  }
  if (s.database.available) {
    text("t-risk", fmt(waitingAmount));
    text("t-risk-detail", waitingCount
      ? fmt(waitingCount) + (waitingCount === 1 ? " payment" : " payments") + ", oldest " + age(waitingOldest)
      : "nothing waiting");
    $("t-risk").parentElement.classList.toggle("waiting", waitingCount > 0);
  }

  const calls = s.gateway.calls || {};
  text("g-calls", fmt(sum(calls)));
  text("g-errors", (100 * s.gateway.error_rate).toFixed(1) + " %");
  text("g-mean", s.gateway.latency_ms.mean.toFixed(1) + " ms");
  text("g-p95", s.gateway.latency_ms.p95_le.toFixed(0) + " ms");
  text("g-status", Object.entries(calls).map(([k, v]) => k + ": " + fmt(v)).join(", ") || "–");

  canReplay = s.can_replay;
  text("mode", canReplay ? "replay enabled with the operator token" : "read-only (no operator token configured)");
  const latestBody = $("latest").tBodies[0];
  latestBody.replaceChildren();
  for (const k of s.database.latest || []) {
    const row = latestBody.insertRow();
    cell(row, k.id); cell(row, k.payment_id || "—"); cell(row, k.error_type, "type-" + k.error_type);
    cell(row, k.reason); cell(row, k.topic + "/" + k.partition + "@" + k.offset);
    const desc = cell(row, k.error_description, "desc"); desc.title = k.error_description;
    cell(row, k.reported ? "yes" : "waiting");
    const action = row.insertCell();
    const button = document.createElement("button");
    button.textContent = k.resolved ? "resolved" : "replay";
    button.dataset.id = k.id;
    button.className = "replay";
    button.disabled = !canReplay || k.resolved;
    button.addEventListener("click", () => replay(k.id, button));
    action.appendChild(button);
  }
}

async function replay(id, button) {
  button.disabled = true;
  const token = $("token").value;
  sessionStorage.setItem("paystream-token", token);
  const response = await fetch("/api/replay/" + id, {
    method: "POST", headers: { "X-Paystream-Token": token },
  });
  const body = await response.json();
  text("replay-result", response.ok
    ? "replayed #" + id + ": stored " + body.stored + ", still kept " + body.kept
    : "replay refused: " + body.error);
}

// The feed is read with fetch rather than EventSource, which cannot send the operator token
// (beyond loopback, payment data is served to the token only; never in the URL).
let feed = null;

async function connect() {
  if (feed) feed.abort();
  const controller = new AbortController();
  feed = controller;
  const token = $("token").value;
  try {
    const response = await fetch("/events", {
      headers: token ? { "X-Paystream-Token": token } : {}, signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      badge("feed", false, "not shown");
      text("mode", body.error || "the feed answered " + response.status);
      return;  // wait for a token to be entered
    }
    badge("feed", true, "live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        if (event.startsWith("data: ")) render(JSON.parse(event.slice(6)));
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  badge("feed", false, "reconnecting");
  setTimeout(() => { if (feed === controller) connect(); }, 2000);
}

$("token").value = sessionStorage.getItem("paystream-token") || "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem("paystream-token", $("token").value);
  connect();
});
connect();
