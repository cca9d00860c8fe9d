// EdgeFleet console: live refresh of the page's main part, confirmations, keyboard labelling.
// No dependencies; served from the wheel, so the console works air-gapped.
"use strict";

const csrf = () => document.body.dataset.csrf || "";

async function refresh() {
  const main = document.getElementById("main");
  if (!main || !main.dataset.live) return;
  const active = document.activeElement;
  if (active && main.contains(active) && /INPUT|SELECT|TEXTAREA/.test(active.tagName)) return;
  try {
    const resp = await fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" });
    const html = await resp.text();
    const doc = new DOMParser().parseFromString(html, "text/html");
    const fresh = doc.getElementById("main");
    const banner = doc.getElementById("status-banner");
    if (fresh && fresh.dataset.live) main.innerHTML = fresh.innerHTML;
    if (banner) document.getElementById("status-banner").innerHTML = banner.innerHTML;
    if (resp.status >= 500 && !banner) throw new Error("HTTP " + resp.status);
    const stamp = document.getElementById("refreshed");
    if (stamp) { stamp.dataset.ts = String(Date.now()); stamp.textContent = "live: updated " + new Date().toLocaleTimeString(); }
  } catch (err) {
    const stamp = document.getElementById("refreshed");
    if (stamp) stamp.textContent = "the console does not answer (" + err + "); retrying";
  }
}

function confirmDecisions() {
  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    if (!form.dataset || !form.dataset.confirm) return;
    const action = ev.submitter ? ev.submitter.value : "decide";
    const reason = form.querySelector("[name=reason]").value;
    if (!window.confirm(`${action} this rollout?\nReason: ${reason}`)) ev.preventDefault();
  });
}

async function post(url, body) {
  const resp = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: JSON.stringify(body),
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.detail || "HTTP " + resp.status);
  return data;
}

function labelling() {
  const queue = document.getElementById("queue");
  if (!queue) return;
  const current = () => queue.querySelector(".sample.current");
  const advance = (el, note) => {
    el.classList.remove("current");
    el.classList.add("done");
    el.querySelector(".result").textContent = note;
    const next = el.nextElementSibling;
    if (next) { next.classList.add("current"); next.scrollIntoView({ block: "nearest" }); }
    const total = document.getElementById("queue-total");
    if (total && note !== "skipped") total.textContent = Math.max(0, parseInt(total.textContent, 10) - 1) + " to label";
  };
  const act = async (el, kind, value) => {
    if (!el) return;
    const id = el.dataset.sample;
    try {
      if (kind === "skip") return advance(el, "skipped");
      if (queue.dataset.mayLabel !== "1") throw new Error("labelling needs the labeller role");
      if (kind === "label") { await post(`/api/v1/samples/${id}/label`, { label: value }); advance(el, "labelled " + value); }
      if (kind === "flag") { await post(`/api/v1/samples/${id}/flag`, { flag: "unusable" }); advance(el, "flagged unusable"); }
    } catch (err) { el.querySelector(".result").textContent = "not saved: " + err.message; }
  };
  queue.addEventListener("click", (ev) => {
    const b = ev.target.closest("button");
    if (!b) return;
    const el = b.closest(".sample");
    queue.querySelectorAll(".sample.current").forEach((s) => s.classList.remove("current"));
    el.classList.add("current");
    if (b.dataset.label) act(el, "label", b.dataset.label);
    else if ("skip" in b.dataset) act(el, "skip");
    else if ("flag" in b.dataset) act(el, "flag");
  });
  document.addEventListener("keydown", (ev) => {
    if (/INPUT|SELECT|TEXTAREA/.test(document.activeElement.tagName) || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const el = current();
    if (!el) return;
    if (/^[1-9]$/.test(ev.key)) {
      const b = el.querySelectorAll("button[data-label]")[parseInt(ev.key, 10) - 1];
      if (b) { ev.preventDefault(); act(el, "label", b.dataset.label); }
    } else if (ev.key === "s") { ev.preventDefault(); act(el, "skip"); }
    else if (ev.key === "u") { ev.preventDefault(); act(el, "flag"); }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  confirmDecisions();
  labelling();
  const every = parseFloat(document.body.dataset.refreshS || "5") * 1000;
  if (document.getElementById("main")?.dataset.live) setInterval(refresh, every);
});
