// laneway operator page. One live feed (/ui/events, a snapshot a second) and the JSON API,
// both with the key the page was opened with (?key=KEY). Read-only. No dependencies: every
// value from the server is put in the page as text (textContent), never as markup.
"use strict";
(() => {
  const apiKey = new URLSearchParams(location.search).get("key") || "";
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  async function api(path) {
    const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
    const resp = await fetch(path, { headers, cache: "no-store" });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) {
      throw new Error((body && body.error && body.error.message) || "HTTP " + resp.status);
    }
    return body;
  }

  const ms = (v) => v === null || v === undefined ? "–"
    : v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(v < 10000 ? 2 : 1) + " s";
  const secs = (s) => ms(s * 1000);
  const clock = (t) => t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "–";
  const when = (t) => t ? new Date(t * 1000).toLocaleString([], { hour12: false }) : "–";
  function ago(t) {
    if (!t) return "–";
    const d = Math.max(0, Date.now() / 1000 - t);
    return d < 60 ? Math.round(d) + " s ago" : d < 3600 ? Math.round(d / 60) + " min ago"
      : d < 86400 ? Math.round(d / 3600) + " h ago" : when(t);
  }
  const pill = (text, cls) => el("span", { class: "pill " + (cls === undefined ? text : cls), text });
  const outcome = (o) => pill(o, o === "ok" || o === "abandoned" ? o : "error");
  const sessionHref = (key, agent, tenant) => "#/session/" + [agent, tenant, key]
    .map((p) => encodeURIComponent(p || "")).join("/");
  const keyLink = (key, agent, tenant) =>
    el("td", { class: "key" }, el("a", { href: sessionHref(key, agent, tenant), text: key }));
  const laneId = (tenant, agent, key) => tenant + "/" + agent + "/" + key;

  function bar(px) { // through the CSSOM: the page's CSP forbids style attributes
    const node = el("i");
    node.style.width = px + "px";
    return node;
  }

  function fill(tbody, rows, emptyId) {
    tbody.replaceChildren(...rows);
    $(emptyId).hidden = rows.length > 0;
  }

  function showFatal(message) {
    $("fatal").textContent = message;
    $("fatal").hidden = !message;
  }

  // -- the live feed ---------------------------------------------------------------------

  let last = null;
  let seenTurns = null; // turn ids already shown, so only new ones flash
  let busyLanes = new Set();

  function connect() {
    const es = new EventSource("/ui/events" + (apiKey ? "?key=" + encodeURIComponent(apiKey) : ""));
    const conn = $("conn");
    es.onmessage = (e) => {
      conn.dataset.state = "live";
      conn.textContent = "live";
      render(JSON.parse(e.data));
    };
    es.onerror = () => {
      conn.dataset.state = "down";
      conn.textContent = "reconnecting…";
      if (es.readyState === EventSource.CLOSED) { // refused (e.g. 401): the browser gave up
        setTimeout(connect, 3000);
      }
    };
  }

  function render(s) {
    last = s;
    document.body.classList.toggle("admin", s.caller.admin);
    $("who").textContent = s.caller.admin ? "admin · all tenants" : "tenant " + s.caller.tenant;
    const st = s.stats;
    $("stat-lanes").textContent = s.lanes.length;
    $("stat-waiting").textContent = s.waiting;
    $("stat-turns").textContent = st.turns;
    $("stat-wait").textContent = ms(st.wait_p50_ms) + " / " + ms(st.wait_p95_ms);
    $("stat-latency").textContent = ms(st.latency_p50_ms) + " / " + ms(st.latency_p95_ms);
    $("stat-errors").textContent = st.errors;
    busyLanes = new Set(s.lanes.map((l) => laneId(l.tenant, l.agent, l.session_key)));
    renderLanes(s.lanes);
    renderRecent(s.recent);
    renderChart(s.chart, s.now);
    noticeSessions(s);
    noticeSession(s);
  }

  function renderLanes(lanes) {
    const rows = lanes.map((l) => el("tr", { "data-session": l.session_key },
      keyLink(l.session_key, l.agent, l.tenant),
      el("td", { text: l.agent }),
      el("td", { class: "tenant-col", text: l.tenant }),
      el("td", {}, l.running ? pill("running") : pill("handing over", "")),
      el("td", { class: "depth-cell", "data-depth": l.queue_depth },
        el("span", { class: "depth" }, el("b", { text: l.queue_depth }),
          bar(Math.min(l.queue_depth * 10, 160)))),
      el("td", { class: "num wait-cell", text: l.queue_depth ? secs(l.oldest_wait_s) : "–" }),
      el("td", { class: "num", text: secs(l.turn_age_s) })));
    fill($("lanes").tBodies[0], rows, "lanes-empty");
  }

  function renderRecent(recent) {
    const fresh = seenTurns !== null;
    const seen = new Set(recent.map((t) => t.turn_id));
    const rows = recent.map((t) => el("tr", {
      "data-turn-id": t.turn_id,
      class: fresh && !seenTurns.has(t.turn_id) ? "fresh" : null,
    },
    el("td", { class: "time", text: clock(t.finished) }),
    keyLink(t.session_key, t.agent, t.tenant),
    el("td", { text: t.agent }),
    el("td", {}, outcome(t.outcome)),
    el("td", { class: "num", text: ms(t.queue_wait_ms) }),
    el("td", { class: "num", text: t.duration_ms > 0 ? ms(t.duration_ms) : "–" })));
    seenTurns = seen;
    fill($("recent").tBodies[0], rows, "recent-empty");
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function renderChart(c, now) {
    const box = $("chart");
    const W = Math.max(320, box.clientWidth || 640), H = 200;
    const pad = { l: 56, r: 12, t: 10, b: 22 };
    const n = c.n.length;
    const series = [
      ["wait", c.wait_avg_ms, c.wait_max_ms],
      ["latency", c.latency_avg_ms, c.latency_max_ms],
    ];
    const all = series.flatMap(([, a, m]) => a.concat(m)).filter((v) => v !== null);
    const top = niceCeil(Math.max(100, ...all));
    const x = (i) => pad.l + (i + 0.5) * (W - pad.l - pad.r) / n;
    const y = (v) => pad.t + (H - pad.t - pad.b) * (1 - v / top);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H });
    for (const v of [0, top / 2, top]) {
      root.append(svg("line", { class: "axis", x1: pad.l, x2: W - pad.r, y1: y(v), y2: y(v) }));
      root.append(svg("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" }, ms(v)));
    }
    const minutes = Math.round(n * c.bucket_s / 60);
    root.append(svg("text", { x: pad.l, y: H - 6 }, "−" + minutes + " min"));
    root.append(svg("text", { x: (pad.l + W - pad.r) / 2, y: H - 6, "text-anchor": "middle" },
      "−" + minutes / 2 + " min"));
    root.append(svg("text", { x: W - pad.r, y: H - 6, "text-anchor": "end" }, "now"));
    for (const [name, avg, max] of series) {
      let run = [];
      const flush = () => {
        if (run.length > 1) root.append(svg("polyline", { class: name, points: run.join(" ") }));
        run = [];
      };
      avg.forEach((v, i) => {
        if (v === null) { flush(); return; }
        run.push(x(i).toFixed(1) + "," + y(v).toFixed(1));
        root.append(svg("circle", { class: name, cx: x(i), cy: y(v), r: 2.5 }));
        root.append(svg("rect", { class: name, x: x(i) - 2, y: y(max[i]) - 2, width: 4,
          height: 4, opacity: 0.45 }));
      });
      flush();
    }
    root.dataset.points = c.n.reduce((a, b) => a + b, 0);
    box.replaceChildren(root);
  }

  // -- sessions list ---------------------------------------------------------------------

  let sessions = [];
  let sessionsLoading = false;
  let sessionsLastTurn; // the feed's newest turn when the list was loaded
  let sessionsLoadedAt = 0;

  async function loadSessions() {
    if (sessionsLoading) return;
    sessionsLoading = true;
    try {
      const all = [];
      let cursor = null;
      do { // every page, up to a bound: the search filters them here, at once
        const q = new URLSearchParams({ limit: "200" });
        if (cursor) q.set("cursor", cursor);
        const page = await api("/v1/sessions?" + q);
        all.push(...page.data);
        cursor = page.next_cursor;
      } while (cursor && all.length < 5000);
      sessions = all.sort((a, b) => b.updated_at - a.updated_at);
      sessionsLoadedAt = Date.now();
      renderSessions();
      showFatal("");
    } catch (e) {
      showFatal("Could not load the sessions: " + e.message);
    } finally {
      sessionsLoading = false;
    }
  }

  function noticeSessions(s) {
    // a session is stored by its first turn's commit, so a new turn is when to look again
    if (s.last_turn_id !== sessionsLastTurn && Date.now() - sessionsLoadedAt > 1500) {
      sessionsLastTurn = s.last_turn_id;
      loadSessions();
    } else {
      renderSessions();
    }
  }

  function renderSessions() {
    const q = $("search").value.trim().toLowerCase();
    const shown = sessions.filter((s) => !q || s.key.toLowerCase().includes(q)
      || s.agent.toLowerCase().includes(q));
    const rows = shown.slice(0, 300).map((s) => {
      const busy = busyLanes.has(laneId(s.tenant, s.agent, s.key));
      return el("tr", { "data-session": s.key },
        keyLink(s.key, s.agent, s.tenant),
        el("td", { text: s.agent }),
        el("td", { class: "tenant-col", text: s.tenant }),
        el("td", {}, busy ? pill("running") : pill("idle", "")),
        el("td", { class: "num", text: s.turns }),
        el("td", { text: ago(s.updated_at) }));
    });
    $("sessions-count").textContent = q ? `${shown.length} of ${sessions.length}`
      : String(sessions.length);
    fill($("sessions").tBodies[0], rows, "sessions-empty");
  }

  // -- one session -----------------------------------------------------------------------

  let current = null; // {agent, tenant, key, busy, newest}

  async function loadSession() {
    const c = current;
    if (!c) return;
    const q = new URLSearchParams({ agent: c.agent });
    if (c.tenant) q.set("tenant", c.tenant);
    const tq = new URLSearchParams({ session: c.key, agent: c.agent });
    if (c.tenant) tq.set("tenant", c.tenant);
    try {
      const [session, turns] = await Promise.all([
        api("/v1/sessions/" + encodeURIComponent(c.key) + "?" + q),
        api("/ui/turns?" + tq),
      ]);
      if (current === c) renderSession(session, turns.data);
    } catch (e) {
      $("s-error").textContent = e.message;
      $("s-error").hidden = false;
    }
  }

  function noticeSession(s) {
    if (!current) return;
    const c = current;
    const mine = (t) => t.session_key === c.key && t.agent === c.agent
      && (!c.tenant || t.tenant === c.tenant);
    const busy = s.lanes.some(mine);
    const newest = Math.max(0, ...s.recent.filter(mine).map((t) => t.finished));
    if (busy !== c.busy || newest > c.newest) {
      c.busy = busy;
      c.newest = newest;
      loadSession();
    }
  }

  function renderSession(s, turns) {
    $("s-error").hidden = true;
    $("s-title").textContent = "Session " + s.key;
    const meta = [
      ["agent", s.agent], ["tenant", s.tenant], ["status", pill(s.status, s.status === "running" ? "running" : "")],
      ["queue depth", String(s.queue_depth)], ["turns", String(s.turns)],
      ["created", when(s.created_at)], ["updated", when(s.updated_at)],
    ];
    $("s-meta").replaceChildren(...meta.map(([k, v]) => el("div", {}, el("dt", { text: k }),
      el("dd", {}, v))));
    $("s-count").textContent = s.messages.length + " messages";
    $("transcript").replaceChildren(...transcript(s.messages));
    const mems = s.memories.map((m) => el("li", {}, m.text, " ",
      m.pinned ? pill("pinned") : null, el("time", { text: when(m.created_at) })));
    $("memories").replaceChildren(...mems);
    $("memories-empty").hidden = mems.length > 0;
    const rows = turns.slice().reverse().map((t) => el("tr", { "data-turn-id": t.turn_id },
      el("td", { class: "time", text: clock(t.created) }),
      el("td", { class: "key", text: t.turn_id }),
      el("td", {}, outcome(t.outcome)),
      el("td", { class: "num", text: ms(t.queue_wait_ms) }),
      el("td", { class: "num", text: t.duration_ms > 0 ? ms(t.duration_ms) : "–" })));
    fill($("s-turns").tBodies[0], rows, "s-turns-empty");
  }

  function text(content) {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.map((p) => p.type === "text" ? p.text : "[" + p.type + "]").join("\n");
    }
    return "";
  }

  function pretty(raw) {
    try { return JSON.stringify(JSON.parse(raw), null, 2); } catch { return String(raw); }
  }

  function transcript(messages) {
    const names = new Map(); // tool_call_id → function name, to label the results
    return messages.map((m) => {
      const li = el("li", { class: "msg " + m.role, "data-role": m.role });
      const role = el("div", { class: "role", text: m.role === "tool" ? "tool result · " : m.role });
      if (m.role === "tool") {
        role.append(el("span", { class: "name", text: names.get(m.tool_call_id) || m.tool_call_id }));
      }
      li.append(role);
      const body = text(m.content);
      if (m.role === "tool") {
        li.append(el("pre", { text: pretty(body) }));
      } else if (body) {
        li.append(el("div", { class: "text", text: body }));
      }
      for (const call of m.tool_calls || []) {
        const fn = call.function || {};
        names.set(call.id, fn.name);
        li.append(el("div", { class: "call", "data-tool": fn.name },
          "→ ", el("span", { class: "fn", text: fn.name }), "(…) ",
          el("pre", { text: pretty(fn.arguments) })));
      }
      return li;
    });
  }

  // -- routing ---------------------------------------------------------------------------

  function route() {
    const m = location.hash.match(/^#\/session\/([^/]*)\/([^/]*)\/(.*)$/);
    $("overview").hidden = !!m;
    $("session").hidden = !m;
    if (!m) {
      current = null;
      return;
    }
    const [agent, tenant, key] = m.slice(1).map(decodeURIComponent);
    current = { agent: agent || "default", tenant, key, busy: false, newest: 0 };
    $("s-title").textContent = "Session " + key;
    $("transcript").replaceChildren();
    loadSession();
  }

  $("search").addEventListener("input", renderSessions);
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => last && renderChart(last.chart, last.now));
  route();
  loadSessions();
  connect();
})();
