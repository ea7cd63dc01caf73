/* edgeloop dashboard: one page, tabs, kept live by the server-sent events of GET /api/v1/events.
 *
 * Every topic event carries that topic's whole view; the page keeps the latest of each in `S` and
 * re-renders only the parts whose HTML changed. All server text goes through esc() (the page's
 * CSP forbids inline scripts and styles as a second wall). Buttons are rendered only for roles
 * that may use them; the API enforces the same roles. */
"use strict";
(() => {
  const RANK = { viewer: 1, operator: 2, engineer: 3, admin: 4 };
  const ME = { user: document.body.dataset.user, role: document.body.dataset.role };
  const can = (role) => (RANK[ME.role] || 0) >= RANK[role];
  const TOPICS = ["fleet", "rollouts", "models", "data", "pipeline", "alerts", "drift", "trends"];
  const S = { tab: "fleet", filter: { group: "", tag: "", online: "", text: "" }, model: null, lineage: {},
              drift: null, driftSeries: null, driftLastId: null, open: new Set(), charts: {}, images: new Map() };
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ helpers
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ESC[c]);
  const num = (v, d = 3) => (v === null || v === undefined || Number.isNaN(Number(v)) ? "–" : Number(v).toFixed(d));
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %");
  const chip = (text, cls) => `<span class="chip ${esc(cls ?? text)}">${esc(text)}</span>`;
  const ts = (iso) => (iso ? `<time data-ts="${esc(iso)}" title="${esc(new Date(iso).toLocaleString())}">${esc(ago(iso))}</time>` : "–");
  const empty = (text, cols) => (cols ? `<tr><td colspan="${cols}" class="empty">${esc(text)}</td></tr>` : `<p class="empty">${esc(text)}</p>`);
  function ago(iso) {
    const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
    if (s < 0) return "just now";
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return new Date(iso).toLocaleDateString();
  }
  function dur(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 60) return `${Number(seconds).toFixed(1)} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
    return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  }
  function setHTML(el, html) {
    if (el && el._html !== html) { el._html = html; el.innerHTML = html; return true; }
    return false;
  }
  function toast(text, kind = "") {
    const el = document.createElement("div");
    el.className = `toast ${kind}`;
    el.textContent = text;
    $("toasts").appendChild(el);
    setTimeout(() => el.remove(), kind === "error" ? 12000 : 5000);
  }

  // ------------------------------------------------------------------ API calls + actions
  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    const r = await fetch(path, init);
    let data = null;
    try { data = await r.json(); } catch (_) { /* no body */ }
    if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
    if (!r.ok) {
      let detail = data && data.detail !== undefined ? data.detail : r.statusText;
      if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
      throw new Error(`${r.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    return data;
  }

  // What each button does: the role that may press it, the call, whether it is destructive.
  const ACTIONS = {
    "rollout.approve": { role: "operator", label: "Approve", title: (id) => `Approve rollout ${id}?`,
      text: "Its waves start: the canary first.", path: (id) => `/api/v1/rollouts/${id}/approve` },
    "rollout.pause": { role: "operator", label: "Pause", title: (id) => `Pause rollout ${id}?`,
      text: "No wave advances and no new device is sent the candidate until it is resumed.",
      path: (id) => `/api/v1/rollouts/${id}/pause` },
    "rollout.resume": { role: "operator", label: "Resume", title: (id) => `Resume rollout ${id}?`,
      text: "Gates are evaluated again and waves advance when they pass.", path: (id) => `/api/v1/rollouts/${id}/resume` },
    "rollout.abort": { role: "operator", label: "Abort", danger: true, title: (id) => `Abort rollout ${id}?`,
      text: "The rollout stops for good; devices follow its failure policy.", path: (id) => `/api/v1/rollouts/${id}/abort` },
    "rollout.rollback": { role: "operator", label: "Roll back", danger: true, title: (id) => `Roll back rollout ${id}?`,
      text: "Every device it switched returns to its previous model.", path: (id) => `/api/v1/rollouts/${id}/rollback` },
    "model.approve": { role: "operator", label: "Approve for production", title: (v) => `Approve v${v} for production?`,
      text: "It becomes the production model; the current one becomes 'previous'.", path: (v) => `/api/v1/models/${v}/approve` },
    "model.rollback": { role: "operator", label: "Roll the fleet back", danger: true,
      title: () => "Roll the fleet back?",
      text: "A rollout under way is rolled back and its version marked rolled back (production stays); with none, the previous production version becomes production again. Every device on another version gets a signed rollback command.",
      path: () => "/api/v1/models/rollback" },
    "model.rollback_to": { role: "operator", label: "Roll the fleet back here", danger: true,
      title: (v) => `Roll the fleet back to v${v}?`,
      text: "It becomes production; the versions after it are marked rolled back, the rollout in the way is rolled back and every device on another version gets a signed rollback command.",
      path: () => "/api/v1/models/rollback", body: (v, reason) => ({ version: Number(v), reason }) },
    "retrain": { role: "engineer", label: "Retrain now", title: () => "Start a retrain now?", minReason: 3,
      text: "Queues a retrain job on the samples collected so far (coalesced with one already queued).",
      path: () => "/api/v1/retrain" },
    "quarantine.release": { role: "engineer", label: "Release", danger: true,
      title: (d) => `Release device ${d} from quarantine?`,
      text: "Its held samples become validated and can go into the next training snapshot.",
      path: (d) => `/api/v1/devices/${encodeURIComponent(d)}/quarantine/release` },
    "job.resolve-halt": { role: "operator", label: "Drop rejects and continue", danger: true, minReason: 3,
      title: (id) => `Drop the rejects of halted job #${id} and continue?`,
      text: "The samples the data contract rejected in this batch are marked rejected (audited) and a retrain is queued on the rest.",
      path: (id) => `/api/v1/jobs/${encodeURIComponent(id)}/resolve-halt` },
  };
  const button = (action, id, label) => {
    const a = ACTIONS[action];
    if (!a || !can(a.role)) return "";
    return `<button class="act${a.danger ? " danger" : ""}" data-action="${esc(action)}" data-id="${esc(id ?? "")}">${esc(label || a.label)}</button>`;
  };

  function ask(a, id) {
    const dlg = $("confirm");
    $("confirm-title").textContent = a.title(id);
    $("confirm-text").textContent = a.text;
    const reason = $("confirm-reason");
    reason.value = "";
    reason.required = Boolean(a.minReason);
    reason.minLength = a.minReason || 0;
    $("confirm-reason-label").textContent = a.minReason ? "Reason (required, kept in the audit log)" : "Reason (kept in the audit log)";
    const ok = $("confirm-ok");
    ok.textContent = a.label;
    ok.className = a.danger ? "primary danger" : "primary";
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok" ? reason.value.trim() : null), { once: true });
      dlg.showModal();
      reason.focus();
    });
  }

  document.addEventListener("click", async (ev) => {
    const btn = ev.target.closest("button[data-action]");
    if (!btn) return;
    ev.stopPropagation();
    const a = ACTIONS[btn.dataset.action];
    const id = btn.dataset.id;
    const reason = await ask(a, id);
    if (reason === null) return;
    btn.disabled = true;
    try {
      await api("POST", a.path(id), a.body ? a.body(id, reason) : { reason });
      toast(`${a.label}: done${id ? " (" + id + ")" : ""}`, "ok");
    } catch (e) {
      toast(`${a.label} failed: ${e.message}`, "error");
    } finally {
      btn.disabled = false;
    }
  });

  // ------------------------------------------------------------------ charts (uPlot)
  const COLORS = ["#38bdf8", "#4ade80", "#fbbf24", "#f87171", "#a78bfa", "#fb923c", "#2dd4bf", "#e879f9"];
  function chart(key, el, seriesDefs, data, { height = 220, axes, scales, bars = false } = {}) {
    if (!el || !window.uPlot || el.offsetParent === null) return; // hidden tab: drawn when shown
    const width = Math.max(240, el.clientWidth - 4);
    const sig = JSON.stringify([seriesDefs.map((s) => [s.label, s.scale]), width, height]);
    let c = S.charts[key];
    if (c && (c.sig !== sig || !el.contains(c.u.root))) { c.u.destroy(); c = null; }
    if (c) { c.u.setData(data); return; }
    el.textContent = "";
    const opts = {
      width, height, legend: { live: true },
      scales: scales || { x: { time: true } },
      axes: axes || [{ stroke: "#94a3b8", grid: { stroke: "#2a3650" } }, { stroke: "#94a3b8", grid: { stroke: "#2a3650" } }],
      series: [{}, ...seriesDefs.map((s, i) => ({
        label: s.label, scale: s.scale || "y", stroke: s.color || COLORS[i % COLORS.length], width: s.width || 2,
        dash: s.dash, points: { show: s.points ?? false }, spanGaps: true,
        fill: s.fill, paths: s.bars ? uPlot.paths.bars({ size: [0.6, 40] }) : undefined,
        value: (u, v) => (v === null || v === undefined ? "–" : Number(v).toFixed(s.digits ?? 3)),
      }))],
    };
    S.charts[key] = { u: new uPlot(opts, data, el), sig };
  }
  // Live charts span at least a minute, so a young series does not stretch across the whole axis.
  const recent = (u, min, max) => [Math.min(min, max - 60), max];
  function noChart(key, el, text) {
    if (S.charts[key]) { S.charts[key].u.destroy(); delete S.charts[key]; }
    setHTML(el, empty(text));
  }

  // ------------------------------------------------------------------ header summary + badges
  function renderSummary() {
    const f = S.fleet, d = S.data, p = S.pipeline, r = S.rollouts, a = S.alerts, dr = S.drift;
    const parts = [];
    if (f) parts.push(`<span class="stat">devices online <b>${f.by_state.online}</b> / ${f.total}</span>`);
    if (r && r.items) {
      const active = r.items.filter((x) => ["pending", "awaiting_approval", "running", "paused"].includes(x.state));
      parts.push(`<span class="stat">rollouts active <b>${active.length}</b></span>`);
      setHTML($("badge-rollouts"), active.length ? String(active.length) : "");
    }
    if (d) parts.push(`<span class="stat">samples <b>${d.pending}</b> / ${d.threshold}</span>`);
    if (p) {
      const running = (p.jobs || []).filter((j) => j.status === "running" || j.status === "queued").length;
      parts.push(`<span class="stat">jobs running <b>${running}</b></span>`);
      setHTML($("badge-pipeline"), running ? String(running) : "");
    }
    if (dr) {
      const n = dr.subjects.filter((s) => s.drifting || s.decayed).length;
      setHTML($("badge-drift"), n ? String(n) : "");
    }
    if (a) {
      const day = Date.now() - 86400e3;
      const n = a.items.filter((x) => new Date(x.at).getTime() > day && x.severity !== "info").length;
      setHTML($("badge-alerts"), n ? String(n) : "");
    }
    setHTML($("summary"), parts.join(""));
  }

  // ------------------------------------------------------------------ fleet
  function fillSelect(sel, values) {
    const html = `<option value="">all</option>` + values.map((v) => `<option value="${esc(v)}">${esc(v)}</option>`).join("");
    const keep = sel.value;
    if (setHTML(sel, html)) sel.value = values.includes(keep) ? keep : "";
  }
  // The device table is one page of GET /api/v1/devices, filtered on the server: the live "fleet"
  // topic carries only aggregates, and each change of it (or of the filters) fetches the page again,
  // at most every FLEET_REFRESH_MS, so a 10,000-device fleet costs one page per refresh.
  const FLEET_PAGE = 100, FLEET_REFRESH_MS = 2000;
  const F = { offset: 0, page: null, key: "", loading: false, again: false, lastLoad: 0, timer: null, error: "" };
  function fleetParams() {
    const flt = S.filter, q = new URLSearchParams({ limit: String(FLEET_PAGE), offset: String(F.offset) });
    if (flt.group) q.set("group", flt.group);
    if (flt.tag) q.append("tag", flt.tag);
    if (flt.online === "online") q.set("online", "true");
    else if (flt.online === "offline") { q.set("online", "false"); q.set("revoked", "false"); }
    else if (flt.online === "revoked") q.set("revoked", "true");
    if (flt.text) q.set("q", flt.text.slice(0, 64));
    return q.toString();
  }
  async function loadFleetPage() {
    if (F.loading) { F.again = true; return; }
    F.loading = true;
    const key = fleetParams();
    try {
      F.page = await api("GET", "/api/v1/devices?" + key);
      F.key = key;
      F.error = "";
    } catch (e) { F.error = String(e.message || e); }
    F.loading = false;
    F.lastLoad = Date.now();
    if (S.tab === "fleet") renderFleetTable();
    if (F.again) { F.again = false; refreshFleetPage(true); }
  }
  function refreshFleetPage(now) {
    if (now) { clearTimeout(F.timer); F.timer = null; loadFleetPage(); return; }
    if (F.timer) return;
    F.timer = setTimeout(() => { F.timer = null; loadFleetPage(); }, Math.max(0, F.lastLoad + FLEET_REFRESH_MS - Date.now()));
  }
  function renderFleetTable() {
    const f = S.fleet, page = F.page;
    const head = `<thead><tr><th>Device</th><th>State</th><th>Agent</th><th>Active</th><th>Candidate</th><th>Update</th>
      <th class="num">fps</th><th class="num">p50 ms</th><th class="num">p99 ms</th><th class="num">Spool</th><th>GPU · TRT</th><th>Last seen</th></tr></thead>`;
    const rows = page ? page.items : [];
    const body = rows.map((d) => {
      const hb = d.heartbeat || {}, hw = d.hardware || {};
      const state = d.revoked ? "revoked" : d.online ? "online" : "offline";
      const labels = d.groups.map((g) => chip(g, "info")).join("") + d.tags.map((t) => chip(t, "")).join("");
      return `<tr data-device="${esc(d.id)}"><td><b>${esc(d.id)}</b><br>${labels}</td>
        <td><span class="dot ${d.revoked ? "revoked" : d.online ? "on" : ""}"></span>${esc(state)}</td>
        <td>${esc(d.agent_version || "–")}</td><td>${d.active_version ? "v" + esc(d.active_version) : "–"}</td>
        <td>${d.candidate_version ? "v" + esc(d.candidate_version) : "–"}</td><td>${d.update_state ? chip(d.update_state, d.update_state.toLowerCase()) : "–"}</td>
        <td class="num">${num(hb.fps, 1)}</td><td class="num">${num(hb.latency_ms_p50, 1)}</td><td class="num">${num(hb.latency_ms_p99, 1)}</td>
        <td class="num">${esc(hb.spool_depth ?? "–")}</td>
        <td><small>${esc(hw.gpu_compute_capability ? "CC " + hw.gpu_compute_capability : hw.gpu || "cpu")}${hw.tensorrt_version ? " · " + esc(hw.tensorrt_version) : ""}</small></td>
        <td>${ts(d.last_seen)}</td></tr>`;
    }).join("") || empty(!page ? (F.error ? "" : "loading…") : f && f.total ? "no device matches the filters" : "no devices enrolled yet", 12);
    setHTML($("fleet-table"), head + `<tbody>${body}</tbody>`);
    const first = page && page.total ? page.offset + 1 : 0, last = page ? page.offset + rows.length : 0;
    const pager = page && page.total > FLEET_PAGE
      ? ` <button type="button" data-fleet-page="-1"${page.offset ? "" : " disabled"}>‹ prev</button><button type="button" data-fleet-page="1"${last < page.total ? "" : " disabled"}>next ›</button>` : "";
    setHTML($("fleet-shown"), F.error ? `<span class="bad">${esc(F.error)}</span>`
      : page ? `${first}–${last} of ${page.total}${f && page.total !== f.total ? ` matching (${f.total} in all)` : ""}${pager}` : "");
  }
  function renderFleet() {
    const f = S.fleet;
    if (!f) return;
    fillSelect($("f-group"), f.groups);
    fillSelect($("f-tag"), f.tags);
    const groups = Object.entries(f.online_per_group || {}).map(([g, n]) => `<tr><td>${g ? esc(g) : "<i>no group</i>"}</td><td class="num">${n}</td></tr>`).join("");
    setHTML($("fleet-counts"), `<h2>Fleet</h2><p><span class="big good">${f.by_state.online}</span> online ·
      <b>${f.by_state.offline}</b> offline · <b>${f.by_state.revoked}</b> revoked</p>
      <table class="dense"><thead><tr><th>group</th><th class="num">online</th></tr></thead><tbody>${groups || empty("none online", 2)}</tbody></table>`);
    renderFleetTable();
    refreshFleetPage(F.key !== fleetParams());
  }
  function renderFleetChart() {
    const t = S.trends;
    const el = $("chart-fleet");
    if (!t || t.fleet.points.length < 2) { noChart("fleet", el, "collecting… (one point every " + (t ? t.every_s : 10) + " s)"); return; }
    const pts = t.fleet.points;
    const col = (i) => pts.map((p) => p[i]);
    chart("fleet", el, [
      { label: "p50 ms (mean)", digits: 1 }, { label: "p99 ms (mean)", digits: 1 }, { label: "p99 ms (worst)", digits: 1, dash: [4, 4] },
      { label: "fps (fleet)", scale: "fps", digits: 1, color: "#a78bfa" },
    ], [col(0), col(3), col(4), col(5), col(2)], {
      scales: { x: { time: true, range: recent } },
      axes: [{ stroke: "#94a3b8", grid: { stroke: "#2a3650" } }, { stroke: "#94a3b8", grid: { stroke: "#2a3650" }, label: "ms" },
        { scale: "fps", side: 1, stroke: "#a78bfa", grid: { show: false }, label: "fps" }],
    });
  }

  // ------------------------------------------------------------------ rollouts
  const ACTIVE = ["pending", "awaiting_approval", "running", "paused"];
  // What an operator may do in each state (server/rollouts/plan.py ACTIONS; the API answers 409 otherwise).
  const ROLLOUT_BUTTONS = {
    pending: ["rollout.pause", "rollout.abort"], awaiting_approval: ["rollout.approve", "rollout.abort"],
    running: ["rollout.pause", "rollout.abort", "rollout.rollback"], paused: ["rollout.resume", "rollout.abort", "rollout.rollback"],
    succeeded: ["rollout.rollback"], aborted: ["rollout.rollback"],
  };
  // How far along a device is in its wave (the wave's bar adds these up against its target).
  const DEVICE_PROGRESS = { pending: 0, deploying: 0.25, shadowing: 0.5, promoting: 0.75, active: 1 };
  const DEVICE_BAD = new Set(["failed", "aborting", "aborted", "rolling_back", "rolled_back"]);
  const deviceClass = (state) => (state === "active" ? "ok" : DEVICE_BAD.has(state) ? "bad" : state === "pending" ? "offline" : "run");
  function gate(g) {
    const cls = g.passed === true ? "pass" : g.passed === false ? "fail" : "";
    const mark = g.passed === true ? "✓" : g.passed === false ? "✗" : "…";
    const fmt = (x) => (typeof x !== "number" ? esc(x ?? "–") : Number.isInteger(x) ? String(x) : num(x, Math.abs(x) >= 100 ? 0 : 3));
    const v = fmt(g.value), th = fmt(g.threshold);
    return `<span class="gate ${cls}" data-gate="${esc(g.name)}" title="${esc(g.name)}: value ${v}, threshold ${th}${g.detail ? " · " + esc(g.detail) : ""}">${mark} ${esc(g.name)}: <b>${v}</b> / ${th}</span>`;
  }
  function waveHTML(r, w) {
    const devices = w.devices || [];
    const target = Math.max(w.target || 0, devices.length);
    const switched = devices.filter((d) => d.state === "active").length;
    const shadowing = devices.filter((d) => d.state === "shadowing").length;
    const done = w.state === "passed" ? target : devices.reduce((a, d) => a + (DEVICE_PROGRESS[d.state] || 0), 0);
    const counts = {};
    devices.forEach((d) => { counts[d.state] = (counts[d.state] || 0) + 1; });
    const key = `wave-${r.id}-${w.index}`;
    const open = S.open.has(key) || (w.state === "running" && !S.open.has(key + ":closed"));
    const rows = devices.map((d) => {
      const s = d.shadow || {};
      return `<tr data-device="${esc(d.device_id)}"><td>${esc(d.device_id)}</td>
        <td>${chip(d.state, deviceClass(d.state))}</td>
        <td>${d.active_version ? "v" + esc(d.active_version) : "–"}</td><td>${d.candidate_version ? "v" + esc(d.candidate_version) : "–"}</td>
        <td>${esc(d.update_state || "–")}</td><td class="num">${esc(s.frames ?? "–")}</td><td class="num">${pct(s.agreement)}</td>
        <td class="num">${pct(s.active_accuracy)}</td><td class="num">${pct(s.candidate_accuracy)}</td>
        <td class="num">${num(s.candidate_latency_ms_p99, 1)}</td><td class="num">${esc(s.errors ?? "–")}</td>
        <td><small>${esc(d.reason || "")}</small></td></tr>`;
    }).join("") || empty("no devices in this wave yet", 12);
    return `<div class="wave" data-wave="${esc(w.index)}">
      <div class="wave-head"><div><b>${esc(w.name || "wave " + w.index)}</b> ${chip(w.state)} <small class="muted">${switched}/${target} switched${shadowing ? ` · ${shadowing} shadowing` : ""}</small></div>
        <progress class="${esc(w.state)}" max="${target || 1}" value="${done}" data-target="${target}"></progress>
        <small class="muted">${w.started_at ? "started " + ts(w.started_at) : "not started"}</small></div>
      <div class="gates">${(w.gates || []).map(gate).join("") || '<span class="muted">no gate values yet</span>'}</div>
      ${w.verdict && w.verdict.reason ? `<small class="muted">${esc(w.phase ? w.phase + " phase · " : "")}${esc(w.verdict.reason)}</small>` : w.reason ? `<small class="muted">${esc(w.reason)}</small>` : ""}
      <details data-open-key="${key}"${open ? " open" : ""}><summary>devices · ${Object.entries(counts).map(([k, n]) => `${esc(k)} ${n}`).join(" · ") || "none"}</summary>
      <div class="scroll short"><table class="dense"><thead><tr><th>Device</th><th>State</th><th>Active</th><th>Candidate</th><th>Update</th>
        <th class="num">Frames</th><th class="num">Agreement</th><th class="num">Acc. active</th><th class="num">Acc. cand.</th>
        <th class="num">Cand. p99 ms</th><th class="num">Errors</th><th>Reason</th></tr></thead><tbody>${rows}</tbody></table></div></details>
    </div>`;
  }
  // The version's offline gate beside the online evidence of its waves.
  function offlineHTML(x) {
    const e = x.offline_evidence;
    if (!e || !e.checks || !e.checks.length) return "";
    const key = `offline-${x.id}`;
    const rows = e.checks.map((c) => `<tr><td>${esc(c.name)}</td><td>${esc(c.metric)}</td><td class="num">${num(c.candidate)}</td>
      <td class="num">${num(c.production)}</td><td class="num">${num(c.threshold)}</td><td>${chip(c.passed ? "passed" : "failed")}</td></tr>`).join("");
    return `<details class="offline" data-open-key="${key}"${S.open.has(key) ? " open" : ""}><summary>offline gate ${e.passed === null ? "" : chip(e.passed ? "passed" : "failed")}
      <small class="muted">v${esc(x.version)} against v${esc(e.parent_version ?? "–")}: ${e.checks.length} checks</small></summary>
      <table class="dense"><thead><tr><th>check</th><th>metric</th><th class="num">v${esc(x.version)}</th><th class="num">v${esc(e.parent_version ?? "–")}</th>
      <th class="num">threshold</th><th></th></tr></thead><tbody>${rows}</tbody></table></details>`;
  }
  function renderRollouts() {
    const r = S.rollouts;
    if (!r) return;
    if (!r.available) { setHTML($("rollouts"), `<div class="card">${empty("This server has no rollout controller.")}</div>`); return; }
    if (!r.items.length) { setHTML($("rollouts"), `<div class="card">${empty("No rollouts yet.")}</div>`); return; }
    const html = r.items.map((x) => {
      const buttons = (ROLLOUT_BUTTONS[x.state] || []).map((a) => button(a, x.id)).join("");
      const sel = x.selector && typeof x.selector === "object"
        ? Object.entries(x.selector).filter(([, v]) => v && (!Array.isArray(v) || v.length)).map(([k, v]) => `${esc(k)}=${esc(Array.isArray(v) ? v.join(",") : typeof v === "object" ? JSON.stringify(v) : v)}`).join(" ")
        : esc(x.selector ?? "");
      const waves = x.waves || [];
      const cur = waves.find((w) => w.index === x.current_wave);
      return `<div class="card rollout" data-rollout="${esc(x.id)}" data-state="${esc(x.state)}">
        <div class="rollout-head"><div class="meta"><h3>Rollout ${esc(x.id)} · v${esc(x.version)}</h3>
          <span class="rollout-state">${chip(x.state)}</span>
          <small class="muted">${esc(x.mode || "")} · on failure: ${esc(x.on_failure || "–")} · ${sel || "all devices"} · by ${esc(x.created_by || "–")} ${ts(x.created_at)}</small></div>
          <div class="buttons">${buttons}</div></div>
        ${x.reason ? `<p class="muted">${esc(x.reason)}</p>` : ""}
        <small class="muted">${waves.length} waves${cur ? " · current: " + esc(cur.name || "wave " + cur.index) : ""} · updated ${ts(x.updated_at)}</small>
        ${offlineHTML(x)}
        <div class="waves">${waves.map((w) => waveHTML(x, w)).join("")}</div></div>`;
    }).join("");
    setHTML($("rollouts"), html);
  }
  document.addEventListener("toggle", (ev) => {
    const key = ev.target.dataset && ev.target.dataset.openKey;
    if (!key) return;
    if (ev.target.open) { S.open.add(key); S.open.delete(key + ":closed"); } else { S.open.delete(key); S.open.add(key + ":closed"); }
  }, true);
  function renderAgreementChart() {
    const r = S.rollouts;
    const el = $("chart-agreement");
    const series = {};
    Object.entries((r && r.agreement) || {}).forEach(([k, v]) => { series[k] = v.points; });
    const ids = Object.keys(series).filter((k) => series[k].length >= 2);
    if (!ids.length) { noChart("agreement", el, "no active rollout with shadow reports yet"); return; }
    const xs = [...new Set(ids.flatMap((k) => series[k].map((p) => p[0])))].sort((a, b) => a - b);
    const defs = [], data = [xs];
    ids.forEach((k) => {
      const m = new Map(series[k].map((p) => [p[0], p[1]]));
      defs.push({ label: `rollout ${k} agreement`, digits: 3 });
      data.push(xs.map((x) => (m.has(x) ? m.get(x) : null)));
    });
    // The agreement gate's threshold of the first rollout that has one, drawn as a line.
    const th = (r && r.items || []).flatMap((x) => (x.waves || []).flatMap((w) => w.gates || [])).find((g) => /agree/i.test(g.name) && typeof g.threshold === "number");
    if (th) { defs.push({ label: `threshold (${th.name})`, color: "#f87171", dash: [6, 4], width: 1 }); data.push(xs.map(() => th.threshold)); }
    chart("agreement", el, defs, data, { scales: { x: { time: true, range: recent }, y: { range: [0, 1] } } });
  }

  // ------------------------------------------------------------------ models
  const evalSets = (m) => Object.keys(m.metrics || {}).filter((k) => typeof m.metrics[k] === "object" && m.metrics[k] !== null);
  function metricCell(m, set, key) { return num(((m.metrics || {})[set] || {})[key]); }
  function renderModels() {
    const M = S.models;
    if (!M) return;
    const prod = M.items.find((m) => m.version === M.production_version);
    const head = `<thead><tr><th>Version</th><th>Status · aliases</th><th>Created</th><th class="num">golden mAP50</th><th class="num">golden mAP50-95</th>
      <th class="num">new-data mAP50</th><th class="num">new-data mAP50-95</th><th>Gate</th><th class="num">Devices</th><th>Parent</th><th></th></tr></thead>`;
    const rows = M.items.map((m) => {
      const tags = [chip(m.status), ...m.aliases.filter((a) => a !== m.status).map((a) => chip(a))].join("");
      const g = m.gate || {};
      const gateCell = g.passed === undefined ? "–" : g.passed ? chip("passed") : chip("failed");
      const act = m.status === "candidate" && g.passed !== false ? button("model.approve", m.version) : "";
      return `<tr class="clickable${S.model === m.version ? " selected" : ""}" data-model="${m.version}"><td><b>v${esc(m.version)}</b></td><td>${tags}</td><td>${ts(m.created_at)}</td>
        <td class="num">${metricCell(m, "golden", "map50")}</td><td class="num">${metricCell(m, "golden", "map50_95")}</td>
        <td class="num">${metricCell(m, "new_data", "map50")}</td><td class="num">${metricCell(m, "new_data", "map50_95")}</td>
        <td>${gateCell}</td><td class="num">${esc(M.devices_running[String(m.version)] || 0)}</td><td>${m.parent_version ? "v" + esc(m.parent_version) : "–"}</td><td>${act}</td></tr>`;
    }).join("") || empty("no models registered yet", 11);
    setHTML($("models-table"), head + `<tbody>${rows}</tbody>`);
    // A rollout under way is what a rollback stops first (production stays); else production goes back.
    const back = M.rolling_out ? `Stop v${M.rolling_out}: the fleet back to v${M.production_version}`
      : M.aliases.previous ? `Roll the fleet back to v${M.aliases.previous}` : "";
    setHTML($("model-actions"), back ? button("model.rollback", "", back) : "");
    if (S.model === null && M.items.length) S.model = (M.items.find((m) => m.status === "candidate") || prod || M.items[0]).version;
    renderModelDetail(prod);
  }
  function compareTable(m, prod) {
    const sets = [...new Set([...evalSets(m), ...(prod ? evalSets(prod) : [])])];
    const keys = ["map50", "map50_95", "precision", "recall"];
    const cell = (a, b) => {
      if (a === undefined || a === null) return `<td class="num">–</td>`;
      const d = b === undefined || b === null ? null : a - b;
      const cls = d === null || Math.abs(d) < 0.0005 ? "" : d > 0 ? "good" : "bad";
      return `<td class="num">${num(a)}${d === null ? "" : ` <small class="${cls}">${d > 0 ? "+" : ""}${num(d)}</small>`}</td>`;
    };
    const rows = sets.map((s) => {
      const a = (m.metrics || {})[s] || {}, b = prod ? (prod.metrics || {})[s] || {} : {};
      return `<tr><td>${esc(s)}</td>${keys.map((k) => cell(a[k], prod && prod !== m ? b[k] : null)).join("")}</tr>`;
    }).join("") || empty("no metrics recorded", 5);
    return `<table class="dense"><thead><tr><th>eval set</th>${keys.map((k) => `<th class="num">${k}</th>`).join("")}</tr></thead><tbody>${rows}</tbody></table>`;
  }
  function perClassTable(m, prod, set) {
    const a = ((m.metrics || {})[set] || {}).per_class || {};
    const b = prod && prod !== m ? ((prod.metrics || {})[set] || {}).per_class || {} : {};
    const names = [...new Set([...Object.keys(a), ...Object.keys(b)])];
    if (!names.length) return "";
    const pair = (x, y) => {
      const d = x !== undefined && y !== undefined ? x - y : null;
      return `<td class="num">${num(x)}</td><td class="num">${num(y)}${d === null || Math.abs(d) < 0.0005 ? "" : ` <small class="${d > 0 ? "good" : "bad"}">${d > 0 ? "+" : ""}${num(d)}</small>`}</td>`;
    };
    const rows = names.map((n) => `<tr><td>${esc(n)}</td>${pair((a[n] || {}).recall, (b[n] || {}).recall)}${pair((a[n] || {}).map50, (b[n] || {}).map50)}${pair((a[n] || {}).precision, (b[n] || {}).precision)}</tr>`).join("");
    const other = prod && prod !== m ? `v${prod.version}` : "–";
    return `<h3>${esc(set)} per class</h3><table class="dense"><thead><tr><th>class</th><th class="num">recall v${esc(m.version)}</th><th class="num">${esc(other)}</th>
      <th class="num">mAP50 v${esc(m.version)}</th><th class="num">${esc(other)}</th><th class="num">precision v${esc(m.version)}</th><th class="num">${esc(other)}</th></tr></thead><tbody>${rows}</tbody></table>`;
  }
  // Versions the fleet may be rolled back to: once production (archived), never rejected or rolled back.
  const ROLLBACK_TARGET = new Set(["archived"]);
  function renderModelDetail(prod) {
    const M = S.models;
    const m = M && M.items.find((x) => x.version === S.model);
    if (!m) { setHTML($("model-detail"), ""); return; }
    const g = m.gate || {};
    const checks = Object.entries(g.checks || {}).map(([name, c]) => {
      if (c && typeof c === "object" && "passed" in c) {
        return `<tr><td>${esc(name)}</td><td class="num">${num(c.candidate)}</td><td class="num">${num(c.production)}</td><td class="num">${num(c.threshold)}</td><td>${chip(c.passed ? "passed" : "failed")}</td></tr>`;
      }
      return Object.entries(c || {}).map(([k, v]) => `<tr><td>${esc(name)} · ${esc(k)}</td><td class="num">${num(v.candidate)}</td><td class="num">${num(v.production)}</td><td class="num">${num(v.threshold)}</td><td>${chip(v.passed ? "passed" : "failed")}</td></tr>`).join("");
    }).join("");
    const lin = S.lineage[m.version];
    let lineage = '<p class="empty">loading lineage…</p>';
    if (lin && lin.error) lineage = `<p class="bad">${esc(lin.error)}</p>`;
    else if (lin) {
      const snaps = lin.snapshots.map((s) => `<div class="node"><b>snapshot ${esc(String(s.id).slice(0, 12))}</b><br><small>${esc(s.samples)} images · ${ts(s.created_at)}</small><br>
        <small>${Object.entries(s.devices || {}).map(([d, n]) => `${esc(d)}: ${n}`).join(" · ") || "no device samples"}</small></div>`).join('<span class="arrow">←</span>');
      const running = S.fleet ? S.fleet.active_versions[String(m.version)] || 0 : 0;
      const shadow = S.fleet ? S.fleet.candidate_versions[String(m.version)] || 0 : 0;
      lineage = `<div class="lineage">${snaps || '<div class="node">no training snapshot (registered from outside)</div>'}
        <span class="arrow">→</span><div class="node"><b>job</b> ${lin.job_id ? "#" + esc(lin.job_id) : "–"}<br><small>parent ${lin.parent_version ? "v" + esc(lin.parent_version) : "–"}</small></div>
        <span class="arrow">→</span><div class="node"><b>v${esc(m.version)}</b><br><small>${lin.approved_by ? "approved by " + esc(lin.approved_by) : "not approved"}</small></div>
        <span class="arrow">→</span><div class="node"><b>devices</b><br><small>active on ${running} device${running === 1 ? "" : "s"}</small><br><small>in shadow on ${shadow}</small></div></div>`;
    }
    const sets = evalSets(m).filter((s) => (m.metrics[s] || {}).per_class);
    setHTML($("model-detail"), `<div class="card"><div class="toolbar"><h2>v${esc(m.version)} ${chip(m.status)}</h2>
      ${m.status === "candidate" && g.passed !== false ? button("model.approve", m.version) : ""}
      ${ROLLBACK_TARGET.has(m.status) && prod && m.version !== prod.version ? button("model.rollback_to", m.version, `Roll the fleet back to v${m.version}`) : ""}
      <small class="muted">${m.reason ? esc(m.reason) : ""}</small>
      <small class="muted">${esc(M.devices_running[String(m.version)] || 0)} device(s) run it</small></div>
      <div class="side"><div><h3>Metrics${prod && prod !== m ? ` vs production v${esc(prod.version)}` : ""}</h3>${compareTable(m, prod)}</div>
      <div><h3>Gate ${g.passed === undefined ? "" : chip(g.passed ? "passed" : "failed")}</h3>
        ${(g.reasons || []).map((x) => `<p><small>${esc(x)}</small></p>`).join("")}
        ${checks ? `<table class="dense"><thead><tr><th>check</th><th class="num">candidate</th><th class="num">production</th><th class="num">threshold</th><th></th></tr></thead><tbody>${checks}</tbody></table>` : ""}</div></div>
      <div class="side">${sets.map((s) => `<div>${perClassTable(m, prod, s)}</div>`).join("")}</div>
      <h3>Lineage</h3>${lineage}</div>`);
    if (!lin || lin.status !== m.status) loadLineage(m);
  }
  async function loadLineage(m) {
    if (S.lineage[m.version] && S.lineage[m.version].loading) return;
    S.lineage[m.version] = { ...(S.lineage[m.version] || {}), loading: true, status: m.status };
    try {
      const lin = await api("GET", `/api/v1/models/${m.version}/lineage`);
      S.lineage[m.version] = { ...lin, status: m.status };
    } catch (e) {
      S.lineage[m.version] = { error: `lineage: ${e.message}`, status: m.status };
    }
    renderModelDetail(S.models.items.find((x) => x.version === S.models.production_version));
  }
  $("models-table").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-model]");
    if (!tr || ev.target.closest("button")) return;
    S.model = Number(tr.dataset.model);
    renderModels();
  });

  // ------------------------------------------------------------------ data
  function renderData() {
    const d = S.data;
    if (!d) return;
    const total = Object.values(d.by_status).reduce((a, b) => a + b, 0);
    setHTML($("data-progress"), `<h2>Samples toward the next retrain</h2>
      <p><span class="big">${esc(d.pending)}</span> of ${esc(d.threshold)} validated, labeled samples not yet trained on</p>
      <progress id="threshold-progress" max="${d.threshold}" value="${Math.min(d.pending, d.threshold)}"></progress>
      <p>${Object.entries(d.by_status).map(([k, n]) => chip(`${k} ${n}`, k)).join("")} <small class="muted">${total} received in all</small></p>`);
    const reasons = d.reject_reasons.map((r) => `<tr><td>${esc(r.reason)}</td><td class="num">${r.count}</td></tr>`).join("") || empty("no rejects", 2);
    const recent = d.rejects.map((r) => `<tr><td>${ts(r.received_at)}</td><td>${esc(r.device_id)}</td><td>${esc(r.reason)}</td><td>${esc(r.reject_reason)}</td></tr>`).join("") || empty("none", 4);
    setHTML($("data-rejects"), `<h2>Validation rejects</h2><table class="dense"><thead><tr><th>reason</th><th class="num">samples</th></tr></thead><tbody>${reasons}</tbody></table>
      <details data-open-key="rejects"${S.open.has("rejects") ? " open" : ""}><summary>most recent rejects</summary><div class="scroll short"><table class="dense"><thead><tr><th>when</th><th>device</th><th>sample reason</th><th>rejected because</th></tr></thead><tbody>${recent}</tbody></table></div></details>`);
    const active = new Set(d.quarantined);
    const q = d.quarantines.map((x) => `<tr><td>${esc(x.device_id)}</td><td>${chip(x.status)}</td><td>${ts(x.decided_at)}</td><td>${esc(x.decided_by)}</td>
      <td><small>${(x.reasons || []).map((r) => esc(typeof r === "string" ? r : JSON.stringify(r))).join("<br>")}</small></td>
      <td class="num">${esc(d.held_samples[x.device_id] || 0)}</td>
      <td>${x.status === "quarantined" && active.has(x.device_id) ? button("quarantine.release", x.device_id) : ""}</td></tr>`).join("") || empty("no device has been quarantined", 7);
    setHTML($("data-quarantine"), `<h2>Quarantined devices <small class="muted">(poisoning defense: their labels are held back)</small></h2>
      <p>${d.quarantined.map((x) => chip(x, "quarantined")).join("") || '<span class="muted">none now</span>'}</p>
      <div class="scroll short"><table class="dense"><thead><tr><th>device</th><th>decision</th><th>when</th><th>by</th><th>reasons</th><th class="num">held</th><th></th></tr></thead><tbody>${q}</tbody></table></div>`);
    renderGallery();
  }
  function renderGallery() {
    const d = S.data;
    const names = (S.models && S.models.class_names) || [];
    const html = d.gallery.map((s) => `<figure data-sample="${esc(s.id)}"><canvas width="${Math.min(320, s.width)}" height="${Math.round(Math.min(320, s.width) * s.height / s.width)}"></canvas>
      <figcaption>${chip(s.status)} ${esc(s.reason)} · ${esc(s.device_id)} · ${ts(s.received_at)}<br>
      ${(s.predictions || []).length} predicted${s.labels ? ` · ${s.labels.length} corrected` : ""}${s.model_version ? ` · model v${esc(s.model_version)}` : ""}
      ${s.reject_reason ? `<br><span class="bad">${esc(s.reject_reason)}</span>` : ""}</figcaption></figure>`).join("") || empty("no frames collected yet");
    if (setHTML($("data-gallery"), html) || $("data-gallery")._names !== names.join()) {
      $("data-gallery")._names = names.join();
      d.gallery.forEach((s) => drawSample(s, names));
    }
  }
  function drawSample(s, names) {
    const fig = $("data-gallery").querySelector(`figure[data-sample="${CSS.escape(s.id)}"]`);
    if (!fig) return;
    const canvas = fig.querySelector("canvas");
    const draw = (img) => {
      const c = canvas.getContext("2d");
      c.drawImage(img, 0, 0, canvas.width, canvas.height);
      const box = (b, color, dashed) => {
        const w = b.w * canvas.width, h = b.h * canvas.height;
        const x = b.cx * canvas.width - w / 2, y = b.cy * canvas.height - h / 2;
        c.setLineDash(dashed ? [4, 3] : []);
        c.strokeStyle = color; c.lineWidth = 2; c.strokeRect(x, y, w, h);
        const label = `${names[b.cls] ?? b.cls}${b.conf !== null && b.conf !== undefined ? " " + Number(b.conf).toFixed(2) : ""}`;
        c.font = "11px system-ui"; c.fillStyle = color;
        c.fillText(label, Math.max(0, x + 2), dashed ? Math.max(10, y - 3) : Math.min(canvas.height - 3, y + h + 11));
      };
      (s.predictions || []).forEach((b) => box(b, "#fb923c", true));
      (s.labels || []).forEach((b) => box(b, "#4ade80", false));
    };
    let img = S.images.get(s.id);
    if (img && img.complete && img.naturalWidth) { draw(img); return; }
    if (!img) {
      img = new Image();
      img.decoding = "async";
      img.src = `/api/v1/samples/${encodeURIComponent(s.id)}/image`;
      S.images.set(s.id, img);
      if (S.images.size > 200) S.images.delete(S.images.keys().next().value);
    }
    img.addEventListener("load", () => draw(img), { once: true });
    img.addEventListener("error", () => { const c = canvas.getContext("2d"); c.fillStyle = "#94a3b8"; c.font = "12px system-ui"; c.fillText("image unavailable", 8, 20); }, { once: true });
  }
  function renderSamplesChart() {
    const d = S.data;
    const el = $("chart-samples");
    if (!d || !d.per_day.length) { noChart("samples", el, "no samples in the last 14 days"); return; }
    const xs = d.per_day.map((p) => Date.parse(p.day + "T00:00:00Z") / 1000);
    const tot = d.per_day.map((p) => Object.entries(p).filter(([k]) => k !== "day").reduce((a, [, v]) => a + v, 0));
    // A fixed 14-day axis, half a day either side: uPlot's own range for one point spans years.
    const day = 86400, today = Date.parse(new Date().toISOString().slice(0, 10) + "T00:00:00Z") / 1000;
    const x0 = Math.min(xs[0], today - 13 * day) - day / 2, x1 = Math.max(xs[xs.length - 1], today) + day / 2;
    chart("samples", el, [
      { label: "received", bars: true, color: "#38bdf8", fill: "#38bdf855", digits: 0 },
      { label: "validated", color: "#4ade80", digits: 0, points: true },
      { label: "rejected", color: "#f87171", digits: 0, points: true },
    ], [xs, tot, d.per_day.map((p) => p.validated || 0), d.per_day.map((p) => p.rejected || 0)],
    { scales: { x: { time: true, range: () => [x0, x1] }, y: { range: (u, mn, mx) => [0, Math.max(1, mx * 1.1)] } } });
  }

  // ------------------------------------------------------------------ pipeline
  function renderPipeline() {
    const p = S.pipeline;
    if (!p) return;
    setHTML($("pipeline-actions"), button("retrain", ""));
    setHTML($("pipeline-counts"), Object.entries(p.by_status).map(([k, n]) => `${esc(k)} ${n}`).join(" · "));
    const h = p.halted;
    const halt = h ? `<div class="card halted" data-halted-job="${esc(h.job_id)}"><div class="toolbar"><h3>Job #${esc(h.job_id)}: batch halted</h3>${chip("halted", "bad")}${button("job.resolve-halt", h.job_id)}</div>
        <p class="bad">${esc(h.halt_reason)}</p><p class="muted">No threshold retrain starts until its rejects are dropped.</p>
        <table class="dense"><thead><tr><th>sample</th><th>device</th><th>reason</th></tr></thead><tbody>${h.items.map((r) => `<tr><td><code>${esc(r.sample_id)}</code></td><td>${esc(r.device_id || "–")}</td><td>${esc(r.reason)}</td></tr>`).join("") || empty("no rejects recorded", 3)}</tbody></table>
        ${h.total > h.items.length ? `<p class="muted">${h.items.length} of ${esc(h.total)} rejects shown: GET /api/v1/jobs/${esc(h.job_id)}/rejects has them all</p>` : ""}</div>` : "";
    const html = halt + (p.jobs.map((j) => {
      const stages = Object.entries(j.stages || {});
      const total = stages.reduce((a, [, s]) => a + (Number(s) || 0), 0) || 1;
      const stageRows = stages.map(([name, s]) => `<tr><td>${esc(name)}</td><td class="num">${dur(s)}</td><td><meter class="stage" min="0" max="${total}" value="${Number(s) || 0}"></meter></td></tr>`).join("");
      const pr = j.progress || {};
      const running = j.status === "running" ? `<p>now: <b>${esc(j.stage || "starting")}</b>${pr.epochs ? ` · epoch ${esc(pr.epoch)}/${esc(pr.epochs)}` : ""}${pr.eta_s ? ` · ETA ${dur(pr.eta_s)}` : ""}</p>
        ${pr.epochs ? `<progress max="${pr.epochs}" value="${pr.epoch || 0}"></progress>` : ""}` : "";
      const res = j.result || {};
      const gateR = res.gate ? `gate ${chip(res.gate.passed ? "passed" : "failed")} ${(res.gate.reasons || []).map((x) => `<small>${esc(x)}</small>`).join("; ")}` : "";
      const outcome = [j.candidate_version ? `candidate <b>v${esc(j.candidate_version)}</b>` : "", gateR,
        res.error ? `<span class="bad">${esc(res.error)}</span>` : "",
        res.halted ? `<span class="bad">data halted${res.halted.resolved ? ` (resolved by ${esc(res.halted.resolved.by)}: ${esc(res.halted.resolved.dropped)} dropped)` : ""}</span>` : ""].filter(Boolean).join(" · ");
      const elapsed = j.started_at ? ((j.finished_at ? new Date(j.finished_at) : new Date()) - new Date(j.started_at)) / 1000 : null;
      const key = `log-${j.id}`;
      return `<div class="card" data-job="${j.id}"><div class="toolbar"><h3>Job #${esc(j.id)}</h3>${chip(j.status)}<small class="muted">${esc(j.trigger)} · ${esc(j.requested_by || "–")} · ${ts(j.created_at)}${elapsed !== null ? (j.finished_at ? " · took " : " · running for ") + dur(elapsed) : ""}${j.coalesced ? ` · ${esc(j.coalesced)} requests coalesced` : ""}</small></div>
        ${j.reason ? `<p class="muted">${esc(j.reason)}</p>` : ""}${running}
        ${stageRows ? `<table class="dense"><thead><tr><th>stage</th><th class="num">time</th><th>share</th></tr></thead><tbody>${stageRows}</tbody></table>` : ""}
        ${outcome ? `<p>${outcome}</p>` : ""}
        <details data-open-key="${key}"${S.open.has(key) ? " open" : ""}><summary>log</summary><pre class="log">${esc(j.log || "(empty)")}</pre></details></div>`;
    }).join("") || `<div class="card">${empty("no retrain jobs yet")}</div>`);
    setHTML($("jobs"), html);
  }
  function renderJobsChart() {
    const p = S.pipeline;
    const el = $("chart-jobs");
    const done = p ? p.jobs.filter((j) => j.started_at && j.finished_at).reverse() : [];
    if (done.length < 2) { noChart("jobs", el, "job durations are charted here once two jobs have finished"); return; }
    chart("jobs", el, [{ label: "job duration (s)", bars: true, color: "#a78bfa", fill: "#a78bfa55", digits: 0 }],
      [done.map((j) => Date.parse(j.finished_at) / 1000), done.map((j) => (Date.parse(j.finished_at) - Date.parse(j.started_at)) / 1000)],
      { height: 160, scales: { x: { time: true }, y: { range: (u, mn, mx) => [0, Math.max(1, mx * 1.1)] } } });
  }

  // ------------------------------------------------------------------ alerts
  function renderAlerts() {
    const a = S.alerts;
    if (!a) return;
    const rows = a.items.map((x) => `<tr><td>${ts(x.at)}</td><td>${chip(x.severity)}</td><td>${esc(x.kind)}</td><td>${esc(x.subject)}</td>
      <td>${esc(x.message)}</td><td><small>${esc(x.webhook_status || "")}</small></td></tr>`).join("") || empty("no alerts", 6);
    setHTML($("alerts-table"), `<thead><tr><th>when</th><th>severity</th><th>kind</th><th>subject</th><th>message</th><th>webhook</th></tr></thead><tbody>${rows}</tbody>`);
  }

  // ------------------------------------------------------------------ drift
  function renderDrift() {
    const d = S.drift;
    if (!d) return;
    if (!S.drift_sel && d.subjects.length) {
      const first = d.subjects.find((s) => s.drifting || s.decayed) || d.subjects[0];
      S.drift_sel = `${first.scope}:${first.subject}`;
    }
    const rows = d.subjects.map((s) => {
      const key = `${s.scope}:${s.subject}`;
      const flags = [s.drifting ? chip("drifting") : "", s.decayed ? chip("decayed") : "", !s.drifting && !s.decayed ? chip(s.status === "scored" ? "ok" : s.status, s.status === "scored" ? "ok" : "offline") : ""].join("");
      return `<tr class="clickable${S.drift_sel === key ? " selected" : ""}" data-subject="${esc(key)}"><td>${esc(s.scope)}</td><td><b>${esc(s.subject)}</b></td><td>${flags}</td>
        <td>${s.drifting_metrics.map((m) => chip(m, "warn")).join("")}</td><td class="num">${pct(s.correction_rate)}</td>
        <td class="num">${esc(s.windows)}</td><td>${s.model_version ? "v" + esc(s.model_version) : "–"}</td><td>${ts(s.last_at)}</td></tr>`;
    }).join("") || empty(d.enabled ? "no drift windows reported yet" : "drift monitoring is off on this server", 8);
    setHTML($("drift-subjects"), `<thead><tr><th>scope</th><th>subject</th><th>state</th><th>drifting metrics</th><th class="num">correction rate</th><th class="num">windows</th><th>model</th><th>last window</th></tr></thead><tbody>${rows}</tbody>`);
    const ev = d.events.map((e) => `<tr><td>${ts(e.at)}</td><td>${esc(e.scope)} <b>${esc(e.subject)}</b></td><td>${esc(e.signal)} ${chip(e.event)}</td>
      <td>${esc(e.action)} ${chip(e.status)}</td>
      <td>${e.alert ? `${chip(e.alert.severity)} <small>${esc(e.alert.message)}</small>` : e.alert_id ? "alert #" + esc(e.alert_id) : "–"}</td>
      <td>${e.job ? `job #${esc(e.job.id)} ${chip(e.job.status)}${e.job.candidate_version ? " → v" + esc(e.job.candidate_version) : ""}` : e.job_id ? "job #" + esc(e.job_id) : "–"}</td>
      <td><small>${esc(Object.entries(e.detail || {}).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" "))}</small></td></tr>`).join("") || empty("no drift or decay signal yet", 7);
    setHTML($("drift-events"), `<thead><tr><th>when</th><th>subject</th><th>signal</th><th>action</th><th>alert fired</th><th>retrain</th><th>detail</th></tr></thead><tbody>${ev}</tbody>`);
    const sel = d.subjects.find((s) => `${s.scope}:${s.subject}` === S.drift_sel);
    if (sel && (sel.last_id !== S.driftLastId || !S.driftSeries || S.driftSeries.key !== S.drift_sel)) loadDriftSeries(sel);
    else renderDriftCharts();
  }
  async function loadDriftSeries(sel) {
    const key = `${sel.scope}:${sel.subject}`;
    S.driftLastId = sel.last_id;
    try {
      const series = await api("GET", `/api/v1/drift/${sel.scope === "group" ? "groups" : "devices"}/${encodeURIComponent(sel.subject)}/windows?limit=500`);
      S.driftSeries = { key, series };
    } catch (e) {
      S.driftSeries = { key, error: e.message };
    }
    renderDriftCharts();
  }
  function renderDriftCharts() {
    const box = $("drift-charts");
    const ds = S.driftSeries;
    if (!ds || ds.key !== S.drift_sel) { setHTML($("drift-title"), "Drift over time"); return; }
    setHTML($("drift-title"), `Drift over time · ${esc(ds.key)}`);
    if (ds.error) { Object.keys(S.charts).filter((k) => k.startsWith("drift:")).forEach((k) => { S.charts[k].u.destroy(); delete S.charts[k]; }); setHTML(box, `<p class="bad">${esc(ds.error)}</p>`); return; }
    const s = ds.series;
    const items = s.items.filter((p) => p.status === "scored");
    const metrics = Object.keys(s.thresholds);
    const hasDecay = items.some((p) => p.correction_rate !== null && p.correction_rate !== undefined);
    const slots = [...metrics.map((m) => [`drift:${ds.key}:${m}`, `${m} (${s.thresholds[m].statistic})`]),
      ...(hasDecay ? [[`drift:${ds.key}:correction_rate`, "correction rate (performance decay)"]] : [])];
    const html = slots.map(([k, title]) => `<div class="mini"><h3>${esc(title)}</h3><div class="chart" data-chart="${esc(k)}"></div></div>`).join("")
      || empty("no scored windows for this subject yet");
    if (setHTML(box, html)) Object.keys(S.charts).filter((k) => k.startsWith("drift:")).forEach((k) => { S.charts[k].u.destroy(); delete S.charts[k]; });
    const xs = items.map((p) => Date.parse(p.at) / 1000);
    metrics.forEach((m) => {
      const th = s.thresholds[m];
      const el = box.querySelector(`[data-chart="${CSS.escape(`drift:${ds.key}:${m}`)}"]`);
      chart(`drift:${ds.key}:${m}`, el, [
        { label: `${th.statistic}`, color: "#38bdf8" },
        { label: "raise above", color: "#f87171", dash: [6, 4], width: 1 },
        { label: "clear below", color: "#fbbf24", dash: [2, 4], width: 1 },
      ], [xs, items.map((p) => (p.values[m] ?? null)), xs.map(() => th.raise_above), xs.map(() => th.clear_below)], { height: 150 });
    });
    if (hasDecay) {
      const el = box.querySelector(`[data-chart="${CSS.escape(`drift:${ds.key}:correction_rate`)}"]`);
      chart(`drift:${ds.key}:correction_rate`, el, [
        { label: "correction rate", color: "#a78bfa" },
        { label: "max (raise)", color: "#f87171", dash: [6, 4], width: 1 },
        { label: "clear below", color: "#fbbf24", dash: [2, 4], width: 1 },
      ], [xs, items.map((p) => p.correction_rate ?? null), xs.map(() => s.decay_thresholds.max_correction_rate ?? null),
        xs.map(() => s.decay_thresholds.clear_correction_rate ?? null)], { height: 150 });
    }
  }
  $("drift-subjects").addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr[data-subject]");
    if (!tr) return;
    S.drift_sel = tr.dataset.subject;
    S.driftSeries = null;
    renderDrift();
  });

  // ------------------------------------------------------------------ tabs, filters, clock
  const RENDER = {
    fleet: () => { renderFleet(); renderFleetChart(); }, rollouts: () => { renderRollouts(); renderAgreementChart(); },
    models: renderModels, data: () => { renderData(); renderSamplesChart(); },
    pipeline: () => { renderPipeline(); renderJobsChart(); }, drift: renderDrift, alerts: renderAlerts,
  };
  function showTab(name) {
    if (!RENDER[name]) name = "fleet";
    S.tab = name;
    document.querySelectorAll("nav.tabs button").forEach((b) => b.setAttribute("aria-selected", String(b.dataset.tab === name)));
    document.querySelectorAll("section.tab").forEach((s) => { s.hidden = s.dataset.tab !== name; });
    if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
    RENDER[name]();
  }
  document.querySelectorAll("nav.tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  [["f-group", "group"], ["f-tag", "tag"], ["f-online", "online"], ["f-text", "text"]].forEach(([id, key]) =>
    $(id).addEventListener("input", (ev) => { S.filter[key] = ev.target.value; F.offset = 0; refreshFleetPage(true); }));
  $("fleet-shown").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-fleet-page]");
    if (!b || !F.page) return;
    F.offset = Math.max(0, F.offset + Number(b.dataset.fleetPage) * FLEET_PAGE);
    refreshFleetPage(true);
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(() => RENDER[S.tab](), 200); });
  setInterval(() => document.querySelectorAll("time[data-ts]").forEach((t) => { t.textContent = ago(t.dataset.ts); }), 1000);

  // ------------------------------------------------------------------ the live stream
  // Which tabs a topic's change must redraw (the visible one at once, the others when shown).
  const AFFECTS = { fleet: ["fleet", "models"], rollouts: ["rollouts"], models: ["models", "data"], data: ["data"],
                    pipeline: ["pipeline"], alerts: ["alerts"], drift: ["drift"], trends: ["fleet"] };
  let source = null;
  let lastEvent = 0;
  function setLive(on, text) {
    const el = $("live");
    el.className = "live " + (on ? "on" : "off");
    el.textContent = text;
  }
  function connect() {
    source = new EventSource("/api/v1/events");
    source.addEventListener("hello", () => setLive(true, "live"));
    TOPICS.forEach((topic) => source.addEventListener(topic, (ev) => {
      S[topic] = JSON.parse(ev.data);
      lastEvent = Date.now();
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      renderSummary();
      if (AFFECTS[topic].includes(S.tab)) RENDER[S.tab]();
    }));
    source.addEventListener("closed", (ev) => {
      const reason = JSON.parse(ev.data).reason || "";
      if (/signed out|revoked/.test(reason)) { source.close(); location.href = "/login"; return; }
      setLive(false, "reconnecting…"); // the browser reconnects by itself
    });
    source.onerror = async () => {
      setLive(false, "reconnecting…");
      if (source.readyState === EventSource.CLOSED) { // refused (401/403/503): find out why, then retry
        try { await api("GET", "/api/v1/models?limit=1"); } catch (_) { return; }
        setTimeout(connect, 3000);
      }
    };
  }
  showTab(location.hash.slice(1) || "fleet");
  connect();
  window.edgeloopDashboard = { state: S, lastEvent: () => lastEvent }; // for tests and curious operators
})();
