// The staff dashboard: a snapshot a second over /ws/dashboard/, drawn without a reload.
// Every user-supplied string is set with textContent, never as markup.
(() => {
  "use strict";
  const root = document.getElementById("dashboard");
  const minutes = parseInt(root.dataset.minutes, 10) || 60;
  const statusEl = document.getElementById("status");
  const notice = document.getElementById("notice");
  const csrf = root.dataset.csrf; // every action carries it: the server refuses actions without it
  const COLORS = { web: "#2563eb", mqtt: "#16a34a", telegram: "#0891b2", system: "#d97706" };
  const series = new Map(); // "minute|protocol" -> count
  let socket = null;
  let attempt = 0;

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function button(text, cls, onClick) {
    const b = el("button", text, cls);
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }

  function send(payload) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ ...payload, csrf }));
  }

  function drawTiles(connections) {
    const tiles = document.getElementById("tiles");
    const items = [["all", connections.total], ...Object.entries(connections.by_protocol)];
    tiles.replaceChildren(...items.map(([label, value]) => {
      const tile = el("div", undefined, "tile");
      tile.dataset.protocol = label;
      tile.append(el("div", value, "value"), el("div", label === "all" ? "connections" : label, "label"));
      return tile;
    }));
  }

  function drawRooms(connections) {
    const body = document.querySelector("#rooms tbody");
    body.replaceChildren(...Object.entries(connections.by_room).sort().map(([room, counts]) => {
      const row = el("tr");
      const detail = Object.entries(counts).map(([p, n]) => `${p} ${n}`).join(", ");
      const actions = el("td");
      actions.append(button("close", "danger", () => {
        if (confirm(`Close room ${room}? Everyone in it is disconnected.`)) send({ action: "close_room", room });
      }));
      row.append(el("td", room), el("td", detail), actions);
      return row;
    }));
    const scopes = document.querySelector("#scopes tbody");
    scopes.replaceChildren(...connections.scopes.map((entry) => {
      const row = el("tr");
      const actions = el("td");
      if (entry.protocol === "web") {
        actions.append(button("disconnect", "quiet", () => send({ action: "disconnect", scope: entry.scope })));
      }
      row.append(el("td", entry.name), el("td", entry.protocol), el("td", entry.room), actions);
      row.dataset.scope = entry.scope;
      return row;
    }));
  }

  function drawServers(processes) {
    const body = document.querySelector("#servers tbody");
    const rows = [];
    for (const proc of processes) {
      for (const [part, state] of Object.entries(proc.status || {}).sort()) {
        const { ready, ...details } = state;
        const row = el("tr");
        row.dataset.part = part;
        const text = Object.entries(details)
          .filter(([, v]) => v !== null && v !== undefined)
          .map(([k, v]) => `${k}: ${k === "last_update" ? new Date(v * 1000).toLocaleTimeString() : v}`)
          .join(", ");
        row.append(el("td", `${proc.host}:${proc.pid}`), el("td", part),
          el("td", ready ? "ready" : "not ready", ready ? "ready" : "not-ready"), el("td", text));
        rows.push(row);
      }
    }
    body.replaceChildren(...rows);
  }

  function when(ts) {
    return ts === null || ts === undefined ? "never" : new Date(ts * 1000).toLocaleString();
  }

  // Failing and paused webhooks are marked (the server sends them first).
  function drawWebhooks(webhooks) {
    const body = document.querySelector("#webhooks tbody");
    document.getElementById("webhooks-none").hidden = webhooks.length > 0;
    body.replaceChildren(...webhooks.map((hook) => {
      const row = el("tr");
      row.dataset.webhook = String(hook.id);
      row.dataset.state = hook.state;
      let state = hook.state;
      if (hook.state === "failing") state = `FAILING since ${when(hook.failing_since)}`;
      if (hook.state === "paused") state = `PAUSED since ${when(hook.paused_at)}`;
      const bad = hook.state === "failing" || hook.state === "paused";
      row.append(el("td", hook.name), el("td", hook.rooms.join(", ")),
        el("td", state, bad ? "not-ready" : hook.state === "active" ? "ready" : "muted"),
        el("td", hook.last_error || "", "muted"), el("td", when(hook.last_success_at)));
      return row;
    }));
  }

  // Devices, the most recently active first (the server sends a bounded number): each
  // room's status with when it changed, the newest state as one cut-short line.
  const STATUS_CLASS = { online: "ready", offline: "not-ready", unknown: "muted" };

  function since(ts) { // the time today, else the date too
    const date = new Date(ts * 1000);
    return date.toDateString() === new Date().toDateString() ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function drawDevices(devices, shownMax) {
    const table = document.getElementById("devices");
    document.getElementById("devices-none").hidden = devices.length > 0;
    const more = document.getElementById("devices-more");
    more.hidden = !(shownMax && devices.length >= shownMax);
    more.textContent = `The ${devices.length} most recently active; the admin lists them all.`;
    table.tBodies[0].replaceChildren(...devices.map((device) => {
      const row = el("tr");
      row.dataset.device = device.id;
      const name = el("td");
      const link = el("a", device.id);
      link.href = `${table.dataset.admin}?q=${encodeURIComponent(device.id)}`;
      name.append(link);
      const rooms = el("td");
      device.rooms.forEach((room, i) => {
        const item = el("span", undefined, "device-room");
        item.dataset.room = room.room;
        item.dataset.status = room.status || "";
        const status = room.status || "posted";
        item.append(el("strong", `#${room.room} `),
          el("span", status, STATUS_CLASS[room.status] || "muted"));
        if (room.status_at) item.append(el("span", ` ${since(room.status_at)}`, "muted"));
        item.title = [room.state_at ? `state ${when(room.state_at)}` : "",
          room.seen_at ? `seen ${when(room.seen_at)}` : ""].filter(Boolean).join(", ");
        if (i > 0) rooms.append(", ");
        rooms.append(item);
      });
      if (device.rooms_more) rooms.append(el("span", ` +${device.rooms_more} more`, "muted"));
      const state = el("td", device.state === null ? "" : device.state, "muted");
      if (device.state_at) state.title = `since ${when(device.state_at)}`;
      row.append(name, rooms, el("td", when(device.last_seen)), state,
        el("td", device.blocked ? "BLOCKED" : "no", device.blocked ? "not-ready" : "muted"),
        el("td", device.commands ? "takes" : "refused", device.commands ? "ready" : "not-ready"));
      row.cells[4].dataset.field = "blocked";
      row.cells[5].dataset.field = "commands";
      return row;
    }));
  }

  function addFeed(items) {
    const feed = document.getElementById("feed");
    for (const m of items) {
      const li = el("li");
      li.dataset.room = m.room;
      li.dataset.id = String(m.id);
      const badge = el("span", m.sender.protocol, "badge badge-" + m.sender.protocol);
      const name = el("span", ` ${m.sender.name}`, "sender");
      if (verified(m.sender)) name.append(" ", verifiedMark());
      li.append(el("span", new Date(m.ts * 1000).toLocaleTimeString() + " ", "muted"),
        el("strong", `#${m.room} `), badge, name, el("span", ": "), el("span", m.text));
      feed.prepend(li);
    }
    while (feed.children.length > 100) feed.lastElementChild.remove();
  }

  // A logged-in account or the system: a display name alone proves nothing.
  function verified(sender) {
    return sender.protocol === "system" || String(sender.id).startsWith("user:");
  }

  function verifiedMark() {
    const mark = el("span", "\u2713", "verified");
    mark.title = "verified: a logged-in account or staff";
    return mark;
  }

  function drawChart(points, reset, now) {
    if (reset) series.clear();
    for (const p of points) {
      const key = `${p.minute}|${p.protocol}`;
      series.set(key, (series.get(key) || 0) + p.count);
    }
    const svg = document.getElementById("chart");
    const ns = "http://www.w3.org/2000/svg";
    const end = Math.floor(now / 60) * 60;
    const start = end - (minutes - 1) * 60;
    const protocols = [...new Set([...series.keys()].map((k) => k.split("|")[1]))].sort();
    const totals = new Map();
    for (const [key, count] of series) {
      const minute = Number(key.split("|")[0]);
      if (minute < start) { series.delete(key); continue; }
      totals.set(minute, (totals.get(minute) || 0) + count);
    }
    const max = Math.max(1, ...totals.values());
    const width = 600 / minutes;
    const nodes = [];
    for (let i = 0; i < minutes; i += 1) {
      const minute = start + i * 60;
      let y = 190;
      for (const protocol of protocols) {
        const count = series.get(`${minute}|${protocol}`) || 0;
        if (!count) continue;
        const h = (count / max) * 170;
        const rect = document.createElementNS(ns, "rect");
        rect.setAttribute("x", String(i * width + 1));
        rect.setAttribute("y", String(y - h));
        rect.setAttribute("width", String(Math.max(1, width - 2)));
        rect.setAttribute("height", String(h));
        rect.setAttribute("fill", COLORS[protocol] || "#6b7280");
        rect.dataset.protocol = protocol;
        const title = document.createElementNS(ns, "title");
        title.textContent = `${new Date(minute * 1000).toLocaleTimeString()}: ${count} ${protocol}`;
        rect.append(title);
        nodes.push(rect);
        y -= h;
      }
    }
    const axis = document.createElementNS(ns, "line");
    axis.setAttribute("x1", "0"); axis.setAttribute("x2", "600");
    axis.setAttribute("y1", "190"); axis.setAttribute("y2", "190");
    axis.setAttribute("stroke", "#9ca3af");
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", "4"); label.setAttribute("y", "14");
    label.setAttribute("font-size", "11"); label.setAttribute("fill", "#6b7280");
    label.textContent = `max ${max}/min`;
    svg.replaceChildren(axis, label, ...nodes);
    const legend = document.getElementById("legend");
    legend.replaceChildren(...protocols.map((protocol) => {
      const item = el("span");
      const swatch = el("span", undefined, "swatch");
      swatch.style.background = COLORS[protocol] || "#6b7280";
      item.append(swatch, document.createTextNode(protocol));
      return item;
    }));
  }

  function onFrame(frame) {
    if (frame.type === "snapshot") {
      drawTiles(frame.connections);
      drawRooms(frame.connections);
      drawServers(frame.processes);
      drawWebhooks(frame.webhooks || []);
      drawDevices(frame.devices || [], frame.devices_shown);
      addFeed(frame.feed);
      drawChart(frame.chart, frame.chart_reset, frame.now);
    } else if (frame.type === "done") {
      notice.textContent = `Done: ${frame.action}`;
    } else if (frame.type === "error") {
      notice.textContent = `Refused: ${frame.detail}`;
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws/dashboard/`);
    socket.addEventListener("open", () => {
      attempt = 0;
      statusEl.textContent = "live";
      statusEl.className = "status ok";
    });
    socket.addEventListener("message", (e) => onFrame(JSON.parse(e.data)));
    socket.addEventListener("close", (e) => {
      socket = null;
      if (e.code === 4403) { // no longer staff: reconnecting would only be refused again
        statusEl.textContent = "stopped";
        statusEl.className = "status bad";
        return;
      }
      statusEl.textContent = "reconnecting…";
      statusEl.className = "status pending";
      const delay = Math.min(15000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
      attempt += 1;
      setTimeout(connect, delay);
    });
  }

  document.getElementById("post").addEventListener("submit", (e) => {
    e.preventDefault();
    const room = document.getElementById("post-room").value.trim();
    const text = document.getElementById("post-text");
    send({ action: "post", room, message: text.value });
    text.value = "";
  });

  connect();
})();
