// The chat page: history, live messages, presence, and reconnect-and-resume.
// Every user-supplied string is set with textContent, never as markup.
(() => {
  "use strict";
  const root = document.getElementById("chat");
  const room = root.dataset.room;
  const historySize = parseInt(root.dataset.history, 10) || 50;
  const loggedInAs = root.dataset.user;
  const list = document.getElementById("messages");
  const statusEl = document.getElementById("status");
  const notice = document.getElementById("notice");
  const form = document.getElementById("composer");
  const textInput = document.getElementById("text");
  const nameInput = document.getElementById("name");
  const membersEl = document.getElementById("members");

  let lastId = 0;          // newest log cursor seen (a message's id is its cursor); resumed after
  let historyLoaded = false;
  let socket = null;
  let attempt = 0;
  let reconnectTimer = null;
  const outbox = new Map(); // client_id -> payload, until the server acks it

  function randomId() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  const uid = localStorage.getItem("gateway.uid") || randomId();
  localStorage.setItem("gateway.uid", uid);
  if (nameInput) {
    nameInput.value = localStorage.getItem("gateway.name") || "";
    nameInput.addEventListener("change", () => {
      localStorage.setItem("gateway.name", nameInput.value.trim());
      if (socket) socket.close(4000, "name changed"); // reconnect under the new name
    });
  }

  function setStatus(text, cls) {
    statusEl.textContent = text;
    statusEl.className = "status " + (cls || "");
  }

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = false;
    clearTimeout(showNotice.timer);
    showNotice.timer = setTimeout(() => { notice.hidden = true; }, 6000);
  }

  // A sender the server vouches for: a logged-in account (its id is "user:<n>") or the
  // system (staff). Anyone can type any display name; this mark is what tells them apart.
  function isVerified(sender) {
    return sender.protocol === "system" || String(sender.id).startsWith("user:");
  }

  function verifiedMark() {
    const mark = document.createElement("span");
    mark.className = "verified";
    mark.textContent = "\u2713";
    mark.title = "verified: a logged-in account or staff";
    mark.setAttribute("aria-label", "verified");
    return mark;
  }

  function render(msg) {
    if (typeof msg.id !== "number" || msg.id <= lastId) return; // already shown
    lastId = msg.id;
    const li = document.createElement("li");
    li.className = "message";
    li.dataset.id = String(msg.id);
    const meta = document.createElement("div");
    meta.className = "meta";
    const name = document.createElement("span");
    name.className = "sender";
    name.textContent = msg.sender.name;
    const badge = document.createElement("span");
    badge.className = "badge badge-" + msg.sender.protocol;
    badge.textContent = msg.sender.protocol;
    const time = document.createElement("time");
    const when = new Date(msg.ts * 1000);
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString();
    meta.append(name);
    if (isVerified(msg.sender)) meta.append(verifiedMark());
    meta.append(badge, time);
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = msg.message;
    li.append(meta, body);
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
    list.append(li);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  async function loadHistory() {
    const url = `/api/rooms/${encodeURIComponent(room)}/messages?limit=${historySize}`;
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error("history: HTTP " + response.status);
    const page = await response.json();
    page.messages.forEach(render);
    // An empty room's history ends at its last id (0 for a new room): resume from there,
    // never replay a whole room.
    lastId = Math.max(lastId, page.last_id);
    historyLoaded = true;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const params = new URLSearchParams({ after: String(lastId) });
    if (!loggedInAs) {
      params.set("uid", uid);
      const name = nameInput ? nameInput.value.trim() : "";
      if (name) params.set("name", name);
    }
    return `${scheme}://${location.host}/ws/chat/${encodeURIComponent(room)}/?${params}`;
  }

  function retryLater() {
    // Exponential backoff with jitter, capped at 15 s.
    const delay = Math.min(15000, 500 * 2 ** attempt) * (0.5 + Math.random() / 2);
    attempt += 1;
    setStatus("reconnecting…", "pending");
    reconnectTimer = setTimeout(connect, delay);
  }

  async function connect() {
    clearTimeout(reconnectTimer);
    setStatus(attempt ? "reconnecting…" : "connecting…", "pending");
    if (!historyLoaded) {
      try { await loadHistory(); } catch (err) { retryLater(); return; }
    }
    socket = new WebSocket(socketUrl());
    socket.addEventListener("open", () => {
      attempt = 0;
      setStatus("connected", "ok");
      flushOutbox(socket);
    });
    socket.addEventListener("message", (e) => {
      const frame = JSON.parse(e.data);
      if (frame.type === "message") render(frame);
      else if (frame.type === "deleted") {
        removeMessage(frame.id);
        if (typeof frame.cursor === "number") lastId = Math.max(lastId, frame.cursor);
      }
      else if (frame.type === "ack") outbox.delete(frame.client_id);
      else if (frame.type === "error") onError(frame);
    });
    socket.addEventListener("close", (e) => {
      socket = null;
      if (e.code in STOPPED) {  // no point in reconnecting by ourselves
        setStatus(e.code === 4410 ? "room closed" : "refused", "bad");
        showNotice(STOPPED[e.code]);
        return;
      }
      if (e.code === 4000) connect(); // our own reconnect (name changed)
      else retryLater();                // resumes after lastId
    });
  }

  // Unacknowledged messages go again after a reconnect, paced below the server's flood
  // limit (5/s): frames beyond it are refused, and a socket refused too often is closed.
  function flushOutbox(ws) {
    const pending = [...outbox.values()];
    const next = () => {
      if (socket !== ws || ws.readyState !== WebSocket.OPEN) return;
      const payload = pending.shift();
      if (payload === undefined) return;
      if (outbox.has(payload.client_id)) ws.send(JSON.stringify(payload));
      setTimeout(next, 250);
    };
    next();
  }

  const STOPPED = {
    4400: "This room name is not valid.",
    4401: "Log in to chat.",
    4403: "Staff disconnected this page. Reload to join again.",
    4404: "There is no such room, and only staff create rooms.",
    4410: "Staff closed this room.",
    4429: "No new rooms can be opened now. Try again later, or join an existing room.",
  };

  function removeMessage(id) {
    const item = list.querySelector(`li.message[data-id="${Number(id)}"]`);
    if (item) item.remove();
  }

  function onError(frame) {
    const payload = frame.client_id && outbox.get(frame.client_id);
    if (payload && (frame.code === "rate_limited" || frame.code === "unavailable")) {
      // Transient: send the same message (same client_id, so stored once) a bit later.
      setTimeout(() => {
        if (outbox.has(payload.client_id) && socket && socket.readyState === WebSocket.OPEN) {
          socket.send(JSON.stringify(payload));
        }
      }, 1500);
      return;
    }
    if (payload) outbox.delete(frame.client_id); // refused for good: do not resend it
    showNotice(frame.detail);
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = textInput.value;
    if (!text.trim()) return;
    const payload = { type: "message", message: text, client_id: randomId() };
    outbox.set(payload.client_id, payload);
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(payload));
    textInput.value = "";
    textInput.focus();
  });

  async function refreshMembers() {
    try {
      const response = await fetch(`/api/rooms/${encodeURIComponent(room)}/`, { credentials: "same-origin" });
      if (!response.ok) return;
      const info = await response.json();
      membersEl.replaceChildren(...info.members.map((m) => {
        const li = document.createElement("li");
        const badge = document.createElement("span");
        badge.className = "badge badge-" + m.protocol;
        badge.textContent = m.protocol;
        li.append(document.createTextNode(m.name + " "));
        if (isVerified(m)) li.append(verifiedMark(), document.createTextNode(" "));
        li.append(badge);
        return li;
      }));
    } catch (err) { /* offline: the next poll retries */ }
  }

  connect();
  refreshMembers();
  setInterval(refreshMembers, 3000);
})();
