// The qubesbus web view: read-only. Every name shown comes from the bus and is
// untrusted, so text goes in through textContent only, never parsed as markup.
"use strict";

const hostsEl = document.getElementById("hosts");
const sections = new Map(); // host id -> its <section>
const maxEvents = 200;

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

const colorRe = /^#[0-9a-f]{6}$/;

function renderHost(h) {
  let sec = sections.get(h.id);
  if (!sec) {
    sec = el("section", { class: "host" });
    sec.dataset.host = h.id;
    sections.set(h.id, sec);
    // Hosts in id order.
    const after = [...sections.keys()].sort().find((id) => id > h.id);
    hostsEl.insertBefore(sec, after ? sections.get(after) : null);
    addHostOption(h.id);
  }
  const old = new Map();
  for (const tr of sec.querySelectorAll("tbody tr")) old.set(tr.dataset.qube, tr.dataset.sig);
  sec.replaceChildren();
  const title = el("h2", {}, h.id);
  title.append(el("span", { class: "meta" }, `${h.qubes.length} qubes · revision ${h.revision}`));
  sec.append(title);
  if (h.error) sec.append(el("p", { class: "error" }, h.error));
  const table = el("table");
  const head = el("tr");
  for (const c of ["qube", "class", "state", "label", "netvm"]) head.append(el("th", {}, c));
  const thead = el("thead");
  thead.append(head);
  table.append(thead);
  const body = el("tbody");
  for (const q of h.qubes) {
    const tr = el("tr");
    tr.dataset.host = h.id;
    tr.dataset.qube = q.name;
    tr.dataset.sig = [q.class, q.state, q.label, q.netvm].join("\u0000");
    tr.append(el("td", { class: "name" }, q.name), el("td", { class: "class" }, q.class));
    const st = el("td", { class: "state" }, q.state);
    st.dataset.state = q.state;
    tr.append(st);
    const label = el("td", { class: "label" });
    const sw = el("span", { class: "swatch" });
    if (colorRe.test(q.color || "")) sw.style.backgroundColor = q.color;
    label.append(sw, document.createTextNode(q.label));
    tr.append(label, el("td", { class: "netvm" }, q.netvm || "–"));
    if (old.size && old.get(q.name) !== tr.dataset.sig) tr.classList.add("flash");
    body.append(tr);
  }
  table.append(body);
  sec.append(table);
  updateQubeNames();
}

function addHostOption(id) {
  const sel = document.getElementById("f-host");
  const opt = el("option", {}, id);
  opt.value = id;
  const after = [...sel.options].slice(1).find((o) => o.value > id);
  sel.insertBefore(opt, after || null);
}

function updateQubeNames() {
  const names = new Set();
  for (const tr of hostsEl.querySelectorAll("tbody tr")) names.add(tr.dataset.qube);
  const list = document.getElementById("qube-names");
  list.replaceChildren(...[...names].sort().map((n) => { const o = el("option"); o.value = n; return o; }));
}

// State: every host's table, again whenever it changes.
const status = document.getElementById("status");
const state = new EventSource("state");
state.addEventListener("host", (e) => renderHost(JSON.parse(e.data)));
state.addEventListener("open", () => { status.textContent = "live"; status.dataset.connected = "true"; });
state.addEventListener("error", () => { status.textContent = "reconnecting…"; status.dataset.connected = "false"; });

// Feed: the events stream, filtered on the server; a new filter opens a new stream.
const list = document.getElementById("events");
const feedError = document.getElementById("feed-error");
let feed = null;
let timer = 0;

function addEvent(ev) {
  const li = el("li");
  li.dataset.event = ev.event;
  li.dataset.vm = ev.vm || "";
  li.append(el("span", { class: "seq" }, `#${ev.seq} `),
    el("span", { class: "time" }, new Date(ev.time).toLocaleTimeString() + " "),
    el("span", { class: "host" }, ev.host + " "),
    el("span", { class: "vm" }, (ev.vm || "-") + " "),
    el("span", { class: "ev" }, ev.event));
  for (const [k, v] of ev.kwargs) li.append(el("span", { class: "kw" }, ` ${k}=${JSON.stringify(v)}`));
  list.prepend(li);
  while (list.children.length > maxEvents) list.lastElementChild.remove();
}

function openFeed() {
  if (feed) feed.close();
  list.replaceChildren();
  feedError.hidden = true;
  const q = new URLSearchParams();
  for (const [k, id] of [["host", "f-host"], ["vm", "f-vm"], ["type", "f-type"]]) {
    const v = document.getElementById(id).value.trim();
    if (v) q.set(k, v);
  }
  feed = new EventSource("events?" + q.toString());
  feed.addEventListener("event", (e) => addEvent(JSON.parse(e.data)));
  feed.addEventListener("error", () => {
    // A refused filter (400) closes the stream for good; a lost connection retries.
    if (feed.readyState === EventSource.CLOSED) {
      feedError.textContent = "the event feed stopped (a filter the server refuses?)";
      feedError.hidden = false;
    }
  });
}

for (const id of ["f-host", "f-vm", "f-type"]) {
  document.getElementById(id).addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(openFeed, 300); });
}
document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
openFeed();
