// The chat page: history, live messages and their changes (edits, deletes, replies and
// reactions), their files, live presence, the room's devices (their status, last state, and
// commands sent to them), and reconnect-and-resume. The wire format is described at the top
// of consumers/websocket.py; the page asks for the extended frames (v=2).
// Files are posted over HTTP (the API, gateway/api.py), and come back as the socket's frames.
// Every user-supplied string is set with textContent, never as markup.
(() => {
  "use strict";
  const root = document.getElementById("chat");
  const room = root.dataset.room;
  const historySize = parseInt(root.dataset.history, 10) || 50;
  const maxLength = parseInt(root.dataset.maxLength, 10) || 0;
  const loggedInAs = root.dataset.user;
  const staff = root.dataset.staff === "1"; // staff may edit and delete any message
  const list = document.getElementById("messages");
  const statusEl = document.getElementById("status");
  const notice = document.getElementById("notice");
  const announcer = document.getElementById("announce");
  const form = document.getElementById("composer");
  const textInput = document.getElementById("text");
  const nameInput = document.getElementById("name");
  const membersEl = document.getElementById("members");
  const devicesSection = document.getElementById("devices-section");
  const devicesEl = document.getElementById("devices");
  const replyBar = document.getElementById("replying");
  const replyName = document.getElementById("replying-to");
  const replyExcerpt = document.getElementById("replying-text");
  const replyCancel = document.getElementById("replying-cancel");
  const attachInput = document.getElementById("attach");
  const stagedEl = document.getElementById("staged");
  const uploadsEl = document.getElementById("uploads");
  const dropZone = root.querySelector(".conversation");

  const REACTIONS = ["\u{1F44D}", "\u2764\uFE0F", "\u{1F602}", "\u{1F62E}", "\u{1F622}", "\u{1F389}"];
  const EXCERPT_LENGTH = 100; // characters of a replied-to message a reply shows (the server's)
  const THUMBNAIL_SIZE = 320; // pixels, the longer side of an image's thumbnail (the server's)
  const COMMAND_MAX = 1000;   // characters of a command's text (the server's)
  const STATE_SHOWN = 300;    // characters of a device's state a card shows
  const STATE_TITLE = 1000;   // ... and its title (the rest is cut)

  let lastId = 0;          // newest log cursor seen (a message's id is its cursor); resumed after
  let historyLoaded = false;
  let socket = null;
  let attempt = 0;
  let reconnectTimer = null;
  let replyTo = null;       // the message the composer answers: {id, name, excerpt}
  let openPicker = null;    // the reaction picker that is open, if any
  const outbox = new Map(); // client_id -> payload (any kind), until the server acks it
  const sent = new Set();   // client_ids this page sent: a frame with one of them is ours
  const shown = new Map();  // message id -> its record on the page (see messageItem)
  const members = new Map(); // "protocol:id" -> {protocol, id, name, connections}
  const devices = new Map(); // device id -> its card on the page (see deviceCard)
  const staged = [];         // files chosen for the next message
  const uploads = new Map(); // client_id -> an upload on its way (see startUpload)

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

  // Who this page is, as the room sees it: a logged-in account's id is known; an anonymous
  // visitor's is a keyed hash of its uid that only the server computes, so the page learns
  // it from the first presence frame ("you"), or the first frame that carries one of its own
  // client_ids (and keeps it with the uid).
  let me = loggedInAs ? { protocol: "web", id: root.dataset.sender } : storedSender();

  function storedSender() {
    try {
      const kept = JSON.parse(localStorage.getItem("gateway.sender") || "null");
      return kept && kept.uid === uid ? { protocol: "web", id: kept.id } : null;
    } catch (err) { return null; }
  }

  function learnSender(frame) {
    // Only while the page does not know yet: client_ids are seen by every member, so another
    // sender could reuse one of ours (the server's "you" is what settles it).
    if (me || !frame.client_id || !sent.has(frame.client_id) || !frame.sender) return;
    iAm(frame.sender);
  }

  function iAm(sender) {  // the server says so (presence's "you"), or a frame of ours did
    if (me && sameSender(me, sender)) return;
    me = { protocol: sender.protocol, id: sender.id };
    if (!loggedInAs) localStorage.setItem("gateway.sender", JSON.stringify({ uid, id: me.id }));
    shown.forEach((rec) => { if (rec.changeable !== mayChange(rec.msg)) paintActions(rec); });
  }

  function sameSender(a, b) {
    return Boolean(a && b) && a.protocol === b.protocol && a.id === b.id;
  }

  function mayChange(msg) {
    return staff || sameSender(me, msg.sender);
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

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(className, text, label, onClick) {
    const b = el("button", className, text);
    b.type = "button";
    if (label) { b.setAttribute("aria-label", label); b.title = label; }
    b.addEventListener("click", onClick);
    return b;
  }

  function excerptOf(text) {
    return Array.from(text).slice(0, EXCERPT_LENGTH).join(""); // code points, as the server
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

  // --- messages --------------------------------------------------------------------------
  // A message's record: {li, msg (its current state, as the server last said), mine (the
  // emoji this page's sender has on it, when known), body, edited, chips, actions, quote,
  // changeable (its actions offer edit and delete), pending (client_id of an edit or delete
  // on its way), editor}.

  function render(msg, live) {
    if (typeof msg.id !== "number" || msg.id <= lastId) return; // already shown
    lastId = msg.id;
    learnSender(msg);
    const rec = messageItem(msg);
    shown.set(msg.id, rec);
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
    list.append(rec.li);
    if (atBottom) list.scrollTop = list.scrollHeight;
    uploadArrived(msg.client_id);
    if (live && !msg.deleted && !sameSender(me, msg.sender)) {
      announcer.textContent = `${msg.sender.name}: ${summary(rec.msg)}`;
    }
  }

  // What a message says in one line: its text, else the names of its files.
  function summary(msg) {
    if (msg.message) return msg.message;
    const names = (msg.attachments || []).map((item) => String(item.name));
    return names.length ? "\u{1F4CE} " + names.join(", ") : "";
  }

  function messageItem(msg) {
    const li = el("li", "message");
    li.dataset.id = String(msg.id);
    li.tabIndex = -1; // where a jump from a reply's quote moves the focus
    const rec = { li, msg: { ...msg, reactions: { ...(msg.reactions || {}) },
                             attachments: Array.isArray(msg.attachments) ? msg.attachments : [] },
                  mine: new Set() };
    const meta = el("div", "meta");
    const name = el("span", "sender", msg.sender.name);
    const badge = el("span", "badge badge-" + msg.sender.protocol, msg.sender.protocol);
    const time = document.createElement("time");
    const when = new Date(msg.ts * 1000);
    time.dateTime = when.toISOString();
    time.textContent = when.toLocaleTimeString();
    rec.edited = el("span", "edited", "(edited)");
    meta.append(name);
    if (isVerified(msg.sender)) meta.append(verifiedMark());
    rec.actions = el("div", "actions"); // on the meta line, shown on hover and focus
    meta.append(badge, time, rec.edited, rec.actions);
    rec.body = el("div", "text");
    rec.chips = el("div", "reactions");
    if (msg.reply_to) {
      rec.quote = quoteButton(msg.reply_to);
      li.append(rec.quote);
    }
    rec.files = msg.deleted ? null : attachmentList(rec.msg.attachments);
    li.append(meta, rec.body);
    if (rec.files) li.append(rec.files);
    li.append(rec.chips);
    if (msg.deleted) markRemoved(rec);
    else { paintMessage(rec); paintActions(rec); }
    return rec;
  }

  function paintMessage(rec) {
    rec.body.textContent = rec.msg.message;
    rec.body.classList.toggle("pending", Boolean(rec.pending));
    rec.edited.hidden = !rec.msg.edited_at;
    if (rec.msg.edited_at) {
      rec.edited.title = "edited " + new Date(rec.msg.edited_at * 1000).toLocaleString();
    }
    paintReactions(rec);
  }

  function markRemoved(rec) {
    rec.msg.deleted = true;
    rec.msg.message = "";
    rec.msg.reactions = {};
    rec.msg.attachments = []; // its files are gone with it (the server no longer serves them)
    if (rec.files) { rec.files.remove(); rec.files = null; }
    rec.pending = null;
    closeEditor(rec);
    if (openPicker && openPicker.rec === rec) closePicker();
    rec.li.classList.remove("pending");
    rec.li.classList.add("removed");
    // Not "text": the message's text is gone, only its place stays.
    rec.body.className = "removed-text";
    rec.body.textContent = "message removed";
    rec.edited.hidden = true;
    if (rec.quote) { rec.quote.remove(); rec.quote = null; }
    rec.chips.replaceChildren();
    rec.actions.replaceChildren();
    if (replyTo && replyTo.id === rec.msg.id) setReply(null);
  }

  function paintActions(rec) {
    if (rec.msg.deleted) return;
    rec.changeable = mayChange(rec.msg);
    const who = rec.msg.sender.name;
    const items = [
      button("act reply", "Reply", `Reply to ${who}`, () => setReply(rec)),
      reactButton(rec),
    ];
    if (rec.changeable) {
      items.push(button("act edit", "Edit", "Edit this message", () => openEditor(rec)));
      items.push(button("act delete", "Delete", "Delete this message", () => confirmDelete(rec)));
    }
    rec.actions.replaceChildren(...items);
  }

  function paintReactions(rec) {
    const counts = rec.msg.reactions || {};
    const chips = new Map([...rec.chips.children].map((c) => [c.dataset.emoji, c]));
    for (const [emoji, chip] of chips) {
      if (!(counts[emoji] > 0)) chip.remove();
    }
    for (const [emoji, count] of Object.entries(counts)) {
      if (!(count > 0)) continue;
      let chip = chips.get(emoji);
      if (!chip) {
        // Said as wanted, not toggled: after a reload the page may not know it is ours.
        chip = button("chip", "", null, () => sendChange(
          { type: "react", id: rec.msg.id, emoji, added: !rec.mine.has(emoji) }));
        chip.dataset.emoji = emoji;
        chip.append(el("span", "emoji", emoji), el("span", "count"));
        rec.chips.append(chip);
      }
      const mine = rec.mine.has(emoji);
      chip.querySelector(".count").textContent = String(count);
      chip.classList.toggle("mine", mine);
      chip.setAttribute("aria-pressed", String(mine));
      const label = `${emoji} ${count}` + (mine ? ", yours: take it back" : ": react with it too");
      chip.setAttribute("aria-label", label);
      chip.title = label;
    }
  }

  function quoteButton(ref) {
    const quote = el("button", "quote");
    quote.type = "button";
    // An empty excerpt: a removed message, or one with files and no text (if the page has it).
    const answered = shown.get(ref.id);
    const files = !ref.excerpt && answered && !answered.msg.deleted ? summary(answered.msg) : "";
    const excerpt = ref.excerpt || files || "message removed";
    quote.append(el("span", "quote-sender", ref.sender.name),
                 el("span", "quote-text" + (ref.excerpt || files ? "" : " gone"), excerpt));
    quote.setAttribute("aria-label", `In reply to ${ref.sender.name}: ${excerpt}. Show it`);
    quote.title = "Show the message this answers";
    quote.addEventListener("click", () => jumpTo(ref.id));
    return quote;
  }

  // What replies on the page show of the message they answer follows its edits and delete.
  function refreshQuotes(id, text) {
    shown.forEach((rec) => {
      const ref = rec.msg.reply_to;
      if (!rec.quote || !ref || ref.id !== id) return;
      ref.excerpt = excerptOf(text);
      const fresh = quoteButton(ref);
      rec.quote.replaceWith(fresh);
      rec.quote = fresh;
    });
  }

  function jumpTo(id) {
    const rec = shown.get(id);
    if (!rec) {
      showNotice("That message is no longer on this page.");
      return;
    }
    rec.li.scrollIntoView({ block: "center", behavior: "smooth" });
    rec.li.focus({ preventScroll: true });
    rec.li.classList.remove("flash");
    void rec.li.offsetWidth; // restart the highlight when jumping to it again
    rec.li.classList.add("flash");
    clearTimeout(rec.flashTimer);
    rec.flashTimer = setTimeout(() => rec.li.classList.remove("flash"), 2000);
  }

  // --- a message's files -----------------------------------------------------------------
  // Each is an element .attachment with data-attachment-id: an image with a thumbnail is
  // shown as it (img.attachment-thumb) in a link to the full size; any other file by its
  // name (a.attachment-link, to download it) and size. Names come from senders: text only.

  function attachmentList(items) {
    const nodes = (items || []).map(attachmentItem).filter(Boolean);
    if (!nodes.length) return null;
    const box = el("div", "attachments");
    box.append(...nodes);
    return box;
  }

  function attachmentItem(item) {
    if (!item || typeof item !== "object") return null;
    const name = String(item.name || "file");
    const size = humanSize(item.size);
    const url = fileUrl(item.url);
    const thumb = fileUrl(item.thumbnail_url);
    const node = el("div", "attachment");
    node.dataset.attachmentId = String(item.id);
    if (url && thumb) {
      node.classList.add("attachment-image");
      const open = el("a", "attachment-open");
      open.setAttribute("href", url);
      open.setAttribute("target", "_blank");
      open.setAttribute("rel", "noopener noreferrer");
      open.setAttribute("title", `${name} (${size}): open the full size`);
      const img = el("img", "attachment-thumb");
      const [width, height] = thumbnailSize(item.width, item.height);
      if (width) {  // its box is known before it loads: no jump when it does
        img.setAttribute("width", String(width));
        img.setAttribute("height", String(height));
      }
      img.setAttribute("alt", name);
      img.setAttribute("loading", "lazy");
      img.setAttribute("src", thumb);
      open.append(img);
      node.append(open);
      return node;
    }
    node.classList.add("attachment-file");
    node.append(el("span", "attachment-kind", kindOf(name)));
    if (url) {
      const link = el("a", "attachment-link", name);
      link.setAttribute("href", url);
      link.setAttribute("download", name);
      link.setAttribute("rel", "noopener noreferrer");
      link.setAttribute("title", `Download ${name}` + (item.type ? ` (${item.type})` : ""));
      node.append(link);
    } else {
      node.append(el("span", "attachment-name", name)); // no URL this page would follow
    }
    node.append(el("span", "attachment-size", size));
    return node;
  }

  // A file's URL as the server signed it: this page's own origin, under /files/. Nothing else
  // goes into an href or a src (the server makes these URLs; still, a frame is data).
  function fileUrl(raw) {
    if (typeof raw !== "string") return null;
    if (!raw.startsWith("/files/") && !raw.startsWith(location.origin + "/files/")) return null;
    let url;
    try { url = new URL(raw, location.origin); } catch (err) { return null; }
    if (url.origin !== location.origin || !url.pathname.startsWith("/files/")) return null;
    return url.href;
  }

  function kindOf(name) {  // what a file is, in a word: its extension (the server's, by type)
    const dot = name.lastIndexOf(".");
    return dot > 0 ? name.slice(dot + 1, dot + 5).toUpperCase() : "FILE";
  }

  function thumbnailSize(width, height) {  // as the server scales it: the longer side at most
    if (!(width > 0 && height > 0)) return [0, 0];
    const scale = Math.min(1, THUMBNAIL_SIZE / Math.max(width, height));
    return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
  }

  function humanSize(bytes) {
    if (typeof bytes !== "number" || !(bytes >= 0)) return "";
    if (bytes < 1024) return bytes === 1 ? "1 byte" : `${bytes} bytes`;
    const units = ["KB", "MB", "GB", "TB"];
    let value = bytes / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
  }

  // --- changes from the room ------------------------------------------------------------

  function onEdit(frame) {
    const rec = shown.get(frame.id);
    if (!rec || rec.msg.deleted) return;
    rec.msg.message = frame.message;
    rec.msg.edited_at = frame.edited_at;
    if (rec.pending === frame.client_id) rec.pending = null;
    if (!rec.pending) paintMessage(rec);
    refreshQuotes(frame.id, frame.message);
    if (replyTo && replyTo.id === frame.id) replyExcerpt.textContent = excerptOf(frame.message);
  }

  function onDelete(frame) {
    const rec = shown.get(frame.id);
    if (rec) markRemoved(rec);
    refreshQuotes(frame.id, "");
  }

  function onReaction(frame) {
    const rec = shown.get(frame.id);
    if (!rec || rec.msg.deleted) return;
    if (frame.count > 0) rec.msg.reactions[frame.emoji] = frame.count;
    else delete rec.msg.reactions[frame.emoji];
    if (sameSender(me, frame.sender)) {
      if (frame.added) rec.mine.add(frame.emoji);
      else rec.mine.delete(frame.emoji);
    }
    paintReactions(rec);
  }

  // A log entry other than a message: applied once, in cursor order (catch-up after a
  // reconnect replays those made while the page was away).
  function onEntry(frame, apply) {
    if (typeof frame.cursor !== "number" || frame.cursor <= lastId) return;
    lastId = frame.cursor;
    learnSender(frame);
    apply(frame);
  }

  // --- presence --------------------------------------------------------------------------

  function memberKey(m) { return m.protocol + ":" + m.id; }

  function onPresence(frame) {
    if (frame.you) iAm(frame.you);
    if (Array.isArray(frame.devices)) onDeviceList(frame.devices); // on joining: all of them
    if (Array.isArray(frame.members)) {  // the full list: it replaces ours
      members.clear();
      frame.members.forEach((m) => members.set(memberKey(m), {
        protocol: m.protocol, id: m.id, name: m.name, connections: m.connections || 1,
      }));
      membersEl.classList.remove("stale");
    }
    (frame.joined || []).forEach((m) => {  // one more connection of each
      const known = members.get(memberKey(m));
      if (known) { known.connections += 1; known.name = m.name; }
      else members.set(memberKey(m), { protocol: m.protocol, id: m.id, name: m.name, connections: 1 });
    });
    (frame.left || []).forEach((m) => {    // one fewer: gone at none
      const known = members.get(memberKey(m));
      if (known && --known.connections <= 0) members.delete(memberKey(m));
    });
    paintMembers();
  }

  function paintMembers() {
    // The server's order: by protocol, then name.
    const order = (a, b) => (a.protocol < b.protocol ? -1 : a.protocol > b.protocol ? 1
      : a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    membersEl.replaceChildren(...[...members.values()].sort(order).map((m) => {
      const li = document.createElement("li");
      const badge = document.createElement("span");
      badge.className = "badge badge-" + m.protocol;
      badge.textContent = m.protocol;
      li.append(document.createTextNode(m.name + " "));
      if (isVerified(m)) li.append(verifiedMark(), document.createTextNode(" "));
      li.append(badge);
      return li;
    }));
  }

  // --- devices ---------------------------------------------------------------------------
  // The room's devices (v2): the full list in the presence frame of every join, then a
  // device frame per change of one's status or state. Cards are updated in place, so a
  // command being typed on one survives its device's changes. A card's record: {data (the
  // device as the server last said), li, dot, status, when, state, seen, seenAt, opener
  // (its Command… button), form (its command form, while open)}.

  const DEVICE_STATUSES = ["online", "offline", "unknown"]; // else none: it never said

  function onDeviceList(list) {
    const listed = new Set();
    list.forEach((d) => {
      if (!isDevice(d)) return;
      listed.add(d.id);
      deviceUpdate(d);
    });
    devices.forEach((card, id) => {
      if (!listed.has(id)) { card.li.remove(); devices.delete(id); }
    });
    devicesEl.classList.remove("stale");
    devicesSection.hidden = !devices.size;
  }

  function onDevice(frame) {
    const d = frame.device;
    if (!isDevice(d)) return;
    const before = devices.get(d.id);
    const was = before ? before.data.status : undefined;
    deviceUpdate(d);
    devicesSection.hidden = !devices.size;
    if (frame.change === "status" && was !== d.status) {
      announcer.textContent = `${d.id} is ${statusWord(d.status)}`;
    }
  }

  function isDevice(d) {
    return Boolean(d) && typeof d === "object" && typeof d.id === "string" && d.id !== "";
  }

  function deviceUpdate(d) {
    let card = devices.get(d.id);
    if (!card) {  // in the server's order (by id), without moving the others
      card = deviceCard(d.id);
      const after = [...devices.keys()].filter((id) => id > d.id).sort()[0];
      devicesEl.insertBefore(card.li, after === undefined ? null : devices.get(after).li);
      devices.set(d.id, card);
    }
    card.data = d;
    paintDevice(card);
  }

  function deviceCard(id) {
    const li = el("li", "device");
    li.dataset.device = id;
    const card = { li, data: null, form: null };
    card.dot = el("span", "device-dot");
    card.dot.setAttribute("aria-hidden", "true"); // the status word says it
    const head = el("div", "device-head");
    head.append(card.dot, el("span", "device-name", id));
    card.status = el("span", "device-status");
    card.when = el("time", "device-when");
    const line = el("div", "device-line");
    line.append(card.status, card.when);
    card.state = el("div", "device-state");
    card.seenAt = el("time", "device-when");
    card.seen = el("div", "device-seen");
    card.seen.append("last seen ", card.seenAt);
    card.opener = button("act device-command", "Command\u2026", `Send ${id} a command`,
                         () => (card.form ? closeCommand(card, true) : openCommand(card)));
    card.opener.setAttribute("aria-expanded", "false");
    li.append(head, line, card.state, card.seen, card.opener);
    return card;
  }

  function paintDevice(card) {
    const d = card.data;
    const status = DEVICE_STATUSES.includes(d.status) ? d.status : "none";
    card.li.dataset.status = status;
    card.dot.className = "device-dot " + status;
    card.status.textContent = statusWord(d.status);
    card.status.title = d.detail && typeof d.detail === "object" ? pairsText(d.detail) : "";
    setTime(card.when, d.status_at, `${statusWord(d.status)} since`);
    paintState(card.state, d.state, d.state_at);
    card.seen.hidden = !setTime(card.seenAt, d.seen_at, "last seen");
  }

  function statusWord(status) {
    return DEVICE_STATUSES.includes(status) ? status : "no status";
  }

  // A time on a card: short (HH:MM today, else the day), the full one in its title.
  function setTime(node, epoch, label) {
    if (typeof epoch !== "number") {
      node.hidden = true;
      return false;
    }
    const when = new Date(epoch * 1000);
    const today = when.toDateString() === new Date().toDateString();
    node.hidden = false;
    node.dateTime = when.toISOString();
    node.textContent = today ? when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
      : when.toLocaleDateString([], { month: "short", day: "numeric" });
    node.title = `${label} ${when.toLocaleString()}`;
    return true;
  }

  // A device's last state: a JSON object as "key: value" pairs, text as it came; long ones
  // cut (the card clamps it to a few lines; its title has more). Text only, never markup.
  function paintState(node, state, at) {
    const isObject = state !== null && typeof state === "object" && !Array.isArray(state);
    const full = isObject ? pairsText(state) : state === null || state === undefined ? ""
      : typeof state === "string" ? state : JSON.stringify(state);
    node.hidden = !full;
    node.title = clip(full, STATE_TITLE) + (typeof at === "number"
      ? `\n(state of ${new Date(at * 1000).toLocaleString()})` : "");
    if (!isObject) {
      node.textContent = clip(full, STATE_SHOWN);
      return;
    }
    node.replaceChildren();
    let length = 0;
    for (const [key, value] of Object.entries(state)) {
      if (length >= STATE_SHOWN) { node.append("\u2026"); break; }
      if (length) node.append(", ");
      const text = clip(valueText(value), STATE_SHOWN);
      const pair = el("span", "state-pair");
      pair.append(el("span", "state-key", clip(key, STATE_SHOWN) + ":"), " " + text);
      node.append(pair);
      length += key.length + text.length + 4;
    }
  }

  function pairsText(object) {
    return Object.entries(object).map(([key, value]) => `${key}: ${valueText(value)}`).join(", ");
  }

  function valueText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function clip(text, size) {
    const chars = Array.from(text);
    return chars.length > size ? chars.slice(0, size - 1).join("") + "\u2026" : text;
  }

  // --- commands to devices -------------------------------------------------------------------
  // From a card's Command… form, or typed as "/cmd <device> <command>": a command frame.
  // The server stores it as a message of the room (which comes back like any other) and
  // the device's answer as a reply to it; a refusal comes as an error frame (onError).

  function openCommand(card) {
    const id = card.data.id;
    const form = el("form", "device-form");
    form.autocomplete = "off";
    const input = el("input", "device-input");
    input.maxLength = COMMAND_MAX;
    input.placeholder = "command";
    input.setAttribute("aria-label", `Command for ${id}`);
    const send = el("button", "device-send", "Send");
    send.type = "submit";
    const cancel = button("act device-cancel", "\u2715", "Cancel the command (Escape)",
                          () => closeCommand(card, true));
    form.append(input, send, cancel);
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (sendCommand(id, input.value)) closeCommand(card, true);
      else input.focus();
    });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { e.preventDefault(); closeCommand(card, true); }
    });
    card.form = form;
    card.opener.setAttribute("aria-expanded", "true");
    card.opener.after(form);
    input.focus();
  }

  function closeCommand(card, refocus) {
    if (!card.form) return;
    card.form.remove();
    card.form = null;
    card.opener.setAttribute("aria-expanded", "false");
    if (refocus && card.opener.isConnected) card.opener.focus();
  }

  function sendCommand(device, text) {
    const command = text.trim();
    if (!command) {
      showNotice(`Type the command to send ${device}.`);
      return false;
    }
    transmit({ type: "command", device, command, client_id: randomId() });
    return true;
  }

  // "/cmd <device> <command>" in the composer: {device, command} (either may be empty);
  // null for any other text, which is a message.
  function typedCommand(text) {
    const match = /^\s*\/cmd(?:\s+|$)([\s\S]*)$/.exec(text);
    if (!match) return null;
    const [, device, command] = /^(\S*)\s*([\s\S]*)$/.exec(match[1]);
    return { device, command };
  }

  // Sent, or why not (the text stays in the composer to be fixed).
  function submitCommand(typed) {
    if (!typed.device) {
      showNotice("Which device? Type /cmd <device> <command>, for example /cmd thermo1 set 22.");
      return false;
    }
    if (!typed.command.trim()) {
      showNotice(`What should ${typed.device} do? Type /cmd ${typed.device} <command>.`);
      return false;
    }
    if (staged.length) {
      showNotice("A command carries no files: remove them to send it.");
      return false;
    }
    return sendCommand(typed.device, typed.command);
  }

  // --- history and the socket ------------------------------------------------------------

  async function loadHistory() {
    const url = `/api/rooms/${encodeURIComponent(room)}/messages?limit=${historySize}`;
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error("history: HTTP " + response.status);
    const page = await response.json();
    page.messages.forEach((msg) => render(msg, false));
    // An empty room's history ends at its last id (0 for a new room): resume from there,
    // never replay a whole room.
    lastId = Math.max(lastId, page.last_id);
    historyLoaded = true;
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    // v=2: the extended frames (edits, deletes, reactions, presence).
    const params = new URLSearchParams({ after: String(lastId), v: "2" });
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

  const HANDLERS = {
    message: (frame) => render(frame, true),
    edit: (frame) => onEntry(frame, onEdit),
    delete: (frame) => onEntry(frame, onDelete),
    reaction: (frame) => onEntry(frame, onReaction),
    presence: onPresence,
    device: onDevice,
    policy: onPolicy,
    pruned: (frame) => showNotice(
      `Older messages of this room were removed (its retention): it now starts at #${frame.first_available}.`),
    ack: onAck,
    error: onError,
  };

  // Staff changed the room's policy: say what it means for this page (staff may still post).
  function onPolicy(frame) {
    const post = frame.policy.post;
    if (post !== null && !post.includes("web")) showNotice("This room takes no messages from web pages now.");
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
      const handle = HANDLERS[frame.type];
      if (handle) handle(frame);
    });
    socket.addEventListener("close", (e) => {
      socket = null;
      membersEl.classList.add("stale"); // until the next full list
      devicesEl.classList.add("stale");
      if (e.code in STOPPED) {  // no point in reconnecting by ourselves
        setStatus(e.code === 4410 ? "room closed" : "refused", "bad");
        showNotice(STOPPED[e.code]);
        return;
      }
      if (e.code === 4000) connect(); // our own reconnect (name changed)
      else retryLater();                // resumes after lastId
    });
  }

  // Unacknowledged frames go again after a reconnect, paced below the server's flood
  // limit (5/s): frames beyond it are refused, and a socket refused too often is closed.
  // The same client_id again is stored once (a reaction is not toggled twice).
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

  function transmit(payload) {
    outbox.set(payload.client_id, payload);
    sent.add(payload.client_id);
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(payload));
  }

  function sendChange(fields) {
    const payload = { ...fields, client_id: randomId() };
    transmit(payload);
    return payload.client_id;
  }

  const STOPPED = {
    4400: "This room name is not valid.",
    4401: "Log in to chat.",
    4403: "This page was disconnected (by staff, or the room is no longer open to web pages). Reload to join again.",
    4404: "There is no such room, and only staff create rooms.",
    4410: "Staff closed this room.",
    4429: "No new rooms can be opened now. Try again later, or join an existing room.",
  };

  // An ack's cursor does not move lastId: the ack can come before the frame of its change,
  // and resuming past that frame would lose it.
  function onAck(frame) {
    const payload = outbox.get(frame.client_id);
    outbox.delete(frame.client_id);
    if (payload && payload.type === "react" && frame.cursor === null) {
      // It was so already (a reaction of ours from before a reload): now the page knows.
      const rec = shown.get(payload.id);
      if (rec) {
        if (payload.added) rec.mine.add(payload.emoji);
        else rec.mine.delete(payload.emoji);
        paintReactions(rec);
      }
      return;
    }
    if (!payload || (payload.type !== "edit" && payload.type !== "delete")) return;
    // Its frame carries the change; an ack without a new cursor (nothing changed, or a change
    // this page already has) has none to wait for.
    if (frame.cursor === null || frame.cursor <= lastId) settle(payload);
  }

  // An edit or a delete of this page's that will not come back as a frame: show the
  // message as the server last said it.
  function settle(payload) {
    const rec = shown.get(payload.id);
    if (!rec || rec.pending !== payload.client_id) return;
    rec.pending = null;
    rec.li.classList.remove("pending");
    if (!rec.msg.deleted) paintMessage(rec);
  }

  function onError(frame) {
    const payload = frame.client_id && outbox.get(frame.client_id);
    if (payload && (frame.code === "rate_limited" || frame.code === "unavailable")) {
      // Transient: send the same frame (same client_id, so stored once) a bit later.
      setTimeout(() => {
        if (outbox.has(payload.client_id) && socket && socket.readyState === WebSocket.OPEN) {
          socket.send(JSON.stringify(payload));
        }
      }, 1500);
      return;
    }
    if (payload) {  // refused for good: do not resend it
      outbox.delete(frame.client_id);
      if (payload.type === "message" && !textInput.value) textInput.value = payload.message;
      else if (payload.type === "command" && !textInput.value) {
        textInput.value = `/cmd ${payload.device} ${payload.command}`; // to be fixed, or not
      } else settle(payload);
    }
    showNotice(frame.detail);
  }

  // --- composing: messages and replies ---------------------------------------------------

  function setReply(rec) {
    replyTo = rec ? { id: rec.msg.id } : null;
    replyBar.hidden = !rec;
    if (!rec) return;
    replyName.textContent = rec.msg.sender.name;
    replyExcerpt.textContent = excerptOf(summary(rec.msg));
    textInput.focus();
  }

  replyCancel.addEventListener("click", () => { setReply(null); textInput.focus(); });
  textInput.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && replyTo) { e.preventDefault(); setReply(null); }
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = textInput.value;
    const typed = typedCommand(text);
    if (typed) {
      if (!submitCommand(typed)) { textInput.focus(); return; }
    } else if (staged.length) {  // files (and the text as their caption) go over HTTP
      startUpload(staged.splice(0), text, replyTo ? replyTo.id : null);
      paintStaged();
    } else {
      if (!text.trim()) return;
      const payload = { type: "message", message: text, client_id: randomId() };
      if (replyTo) payload.reply_to = replyTo.id;
      transmit(payload);
    }
    setReply(null);
    textInput.value = "";
    textInput.focus();
  });

  // --- editing and deleting ---------------------------------------------------------------

  function openEditor(rec) {
    if (rec.editor || rec.msg.deleted) return;
    const editor = el("form", "editor");
    const input = el("input", "edit-box");
    input.value = rec.msg.message;
    if (maxLength) input.maxLength = maxLength;
    input.setAttribute("aria-label", "Edit the message");
    const hint = el("span", "hint", "Enter to save, Escape to cancel");
    const cancel = button("act", "Cancel", "Cancel the edit", () => closeEditor(rec, true));
    const save = el("button", "act save", "Save");
    save.type = "submit";
    editor.append(input, save, cancel, hint);
    editor.addEventListener("submit", (e) => { e.preventDefault(); saveEdit(rec, input.value); });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { e.preventDefault(); closeEditor(rec, true); }
    });
    rec.editor = editor;
    rec.body.hidden = true;
    rec.body.after(editor);
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
  }

  function closeEditor(rec, refocus) {
    if (!rec.editor) return;
    rec.editor.remove();
    rec.editor = null;
    rec.body.hidden = false;
    if (refocus) {
      const edit = rec.actions.querySelector(".edit");
      if (edit) edit.focus();
    }
  }

  function saveEdit(rec, text) {
    if (text === rec.msg.message) { closeEditor(rec, true); return; }
    if (!text.trim()) {
      showNotice("A message cannot be empty: delete it instead.");
      return;
    }
    // Shown at once, dimmed, until the room's edit frame confirms it (or an error undoes it).
    rec.pending = sendChange({ type: "edit", id: rec.msg.id, message: text });
    closeEditor(rec, true);
    rec.body.textContent = text;
    rec.body.classList.add("pending");
  }

  function confirmDelete(rec) {
    const restore = () => { paintActions(rec); focusIn(rec.actions, ".delete"); };
    const yes = button("act danger confirm-delete", "Delete", "Yes, delete this message", () => {
      rec.pending = sendChange({ type: "delete", id: rec.msg.id });
      rec.li.classList.add("pending");
      paintActions(rec);
      rec.li.focus({ preventScroll: true }); // its buttons go with it
    });
    const no = button("act cancel-delete", "Keep", "No, keep this message", restore);
    const question = el("span", "confirm", "Delete this message?");
    rec.actions.replaceChildren(question, yes, no);
    rec.actions.addEventListener("keydown", function escape(e) {
      if (e.key !== "Escape") return;
      rec.actions.removeEventListener("keydown", escape);
      if (rec.actions.contains(no)) restore();
    });
    no.focus();
  }

  function focusIn(container, selector) {
    const target = container.querySelector(selector);
    if (target) target.focus();
  }

  // --- reactions ---------------------------------------------------------------------------

  function reactButton(rec) {
    const react = button("act react", "React", "Add a reaction", () => {
      if (openPicker && openPicker.rec === rec) closePicker(true);
      else showPicker(rec, react);
    });
    react.setAttribute("aria-haspopup", "true");
    react.setAttribute("aria-expanded", "false");
    return react;
  }

  function showPicker(rec, opener) {
    closePicker();
    const picker = el("div", "picker");
    picker.setAttribute("role", "group");
    picker.setAttribute("aria-label", "Reactions");
    REACTIONS.forEach((emoji) => picker.append(
      button("pick", emoji, `React with ${emoji}`, () => {
        sendChange({ type: "react", id: rec.msg.id, emoji, added: true });
        closePicker(true);
      })));
    picker.addEventListener("keydown", (e) => {
      if (e.key === "Escape") { e.preventDefault(); closePicker(true); }
    });
    opener.setAttribute("aria-expanded", "true");
    opener.after(picker);
    openPicker = { rec, picker, opener };
    picker.firstChild.focus();
  }

  function closePicker(refocus) {
    if (!openPicker) return;
    const { picker, opener } = openPicker;
    openPicker = null;
    picker.remove();
    opener.setAttribute("aria-expanded", "false");
    if (refocus && opener.isConnected) opener.focus();
  }

  document.addEventListener("click", (e) => {
    if (openPicker && !openPicker.picker.contains(e.target) && e.target !== openPicker.opener) {
      closePicker();
    }
  });

  // --- files: attaching and uploading ------------------------------------------------------
  // Chosen (the attach button), dropped on the conversation or pasted, files wait beside the
  // composer; Send posts them with the text as their caption over HTTP (multipart, with the
  // session and its CSRF token), not the socket. The upload shows its progress, or the API's
  // refusal, until the message it made arrives as a frame like any other (by its client_id).

  function stage(files) {
    const added = Array.from(files || []).filter((file) => file instanceof File);
    if (!added.length) return;
    staged.push(...added);
    paintStaged();
    textInput.focus();
  }

  function paintStaged() {
    stagedEl.hidden = !staged.length;
    textInput.placeholder = staged.length ? "Add a caption (optional)" : "Type a message";
    stagedEl.replaceChildren(...staged.map((file, i) => {
      const li = el("li", "staged-file");
      li.append(el("span", "file-name", file.name), el("span", "file-size", humanSize(file.size)),
        button("act unstage", "\u2715", `Remove ${file.name}`, () => {
          staged.splice(i, 1);
          paintStaged();
          textInput.focus();
        }));
      return li;
    }));
  }

  // Django's CSRF token: the cookie (current, if another tab logged in meanwhile), else the
  // one the page was rendered with.
  function csrfToken() {
    const cookie = document.cookie.split("; ").find((c) => c.startsWith("csrftoken="));
    if (cookie) return decodeURIComponent(cookie.slice("csrftoken=".length));
    const field = form.querySelector("input[name=csrfmiddlewaretoken]");
    return field ? field.value : "";
  }

  function startUpload(files, text, replyId) {
    const job = { clientId: randomId(), files, text, replyId, xhr: null };
    sent.add(job.clientId);
    job.li = uploadItem(job);
    uploads.set(job.clientId, job);
    uploadsEl.append(job.li);
    sendUpload(job);
  }

  function uploadForm(job) {
    const data = new FormData();
    if (job.text.trim()) data.append("message", job.text);
    data.append("client_id", job.clientId); // the same again (a retry) is stored once
    if (job.replyId) data.append("reply_to", String(job.replyId));
    if (!loggedInAs) {  // who an anonymous visitor is, as on the socket
      const name = nameInput ? nameInput.value.trim() : "";
      if (name) data.append("name", name);
      data.append("uid", uid);
    }
    job.files.forEach((file) => data.append("file", file, file.name));
    return data;
  }

  function sendUpload(job) {
    const xhr = new XMLHttpRequest();
    job.xhr = xhr;
    paintUpload(job, "sending", 0);
    xhr.open("POST", `/api/rooms/${encodeURIComponent(room)}/messages`);
    xhr.setRequestHeader("X-CSRFToken", csrfToken());
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable && job.xhr === xhr) paintUpload(job, "sending", e.loaded / e.total);
    });
    // All sent: the server checks the files and stores the message.
    xhr.upload.addEventListener("load", () => { if (job.xhr === xhr) paintUpload(job, "checking", 1); });
    xhr.addEventListener("load", () => uploadAnswered(job, xhr));
    xhr.addEventListener("error", () => uploadFailed(job, "Not sent: the connection failed.", true));
    xhr.addEventListener("abort", () => { if (job.xhr === xhr) dropUpload(job); });
    xhr.send(uploadForm(job));
  }

  const UPLOAD_STATUS = {
    413: "the files are too large", 415: "this type of file is not taken",
    429: "too many messages; try again in a moment", 502: "the gateway is unavailable",
    503: "the gateway is unavailable", 504: "the gateway did not answer in time",
  };
  const UPLOAD_HINTS = {  // what the visitor can do about it (an API client's words otherwise)
    unauthorized: "log in to attach files",
    login_required: "log in to attach files",
    csrf_failed: "reload the page and try again",
  };

  function uploadAnswered(job, xhr) {
    if (!uploads.has(job.clientId) || job.xhr !== xhr) return;
    job.xhr = null;
    let body = null;
    try { body = JSON.parse(xhr.responseText); } catch (err) { body = null; }
    if (xhr.status >= 200 && xhr.status < 300) {
      paintUpload(job, "sent", 1);
      // Shown when its frame arrives (now, or with a reconnect's catch-up); already, if so.
      if (body && typeof body.id === "number" && body.id <= lastId) dropUpload(job);
      return;
    }
    const refusal = body && body.type === "error" ? body : {};
    const reason = UPLOAD_HINTS[refusal.code] || refusal.detail || UPLOAD_STATUS[xhr.status]
      || `HTTP ${xhr.status}`;
    uploadFailed(job, `Not sent: ${reason}.`.replace(/\.\.$/, "."),
                 xhr.status === 429 || xhr.status >= 500);
  }

  function uploadFailed(job, text, transient) {
    if (!uploads.has(job.clientId)) return;
    job.xhr = null;
    paintUpload(job, transient ? "retry" : "failed", null, text);
    showNotice(text);
    // Refused for good: the caption comes back to the composer (as a refused frame's text).
    if (!transient && job.text && !textInput.value) textInput.value = job.text;
  }

  function uploadArrived(clientId) {
    const job = clientId && uploads.get(clientId);
    if (job) dropUpload(job);
  }

  function dropUpload(job) {
    uploads.delete(job.clientId);
    job.xhr = null;
    job.li.remove();
  }

  function uploadItem(job) {
    const li = el("li", "upload");
    li.dataset.clientId = job.clientId;
    const names = job.files.map((file) => file.name).join(", ");
    const bar = el("progress", "upload-progress");
    bar.max = 100;
    bar.setAttribute("aria-label", `Uploading ${names}`);
    li.append(el("span", "upload-files", names), bar, el("span", "upload-state"),
              el("span", "upload-actions"));
    return li;
  }

  // An upload's state: sending (with its fraction), checking, sent (its frame is awaited),
  // retry (failed, may be sent again) or failed (refused for good).
  function paintUpload(job, state, fraction, error) {
    const li = job.li;
    li.className = "upload " + state;
    const bar = li.querySelector(".upload-progress");
    const label = li.querySelector(".upload-state");
    bar.hidden = state === "retry" || state === "failed";
    if (fraction !== null) bar.value = Math.round(fraction * 100);
    label.textContent = state === "sending" ? `${Math.round(fraction * 100)}%`
      : state === "checking" ? "checking\u2026" : state === "sent" ? "sent" : error;
    const actions = [];
    if (state === "sending") {
      actions.push(button("act cancel-upload", "Cancel", "Cancel this upload", () => {
        if (job.xhr) job.xhr.abort();
      }));
    }
    if (state === "retry") {
      actions.push(button("act retry-upload", "Retry", "Send these files again", () => sendUpload(job)));
    }
    if (state === "retry" || state === "failed") {
      actions.push(button("act dismiss-upload", "Dismiss", "Dismiss this upload", () => dropUpload(job)));
    }
    li.querySelector(".upload-actions").replaceChildren(...actions);
  }

  attachInput.addEventListener("change", () => {
    stage(attachInput.files);
    attachInput.value = ""; // the same file may be chosen again
  });

  textInput.addEventListener("paste", (e) => {
    const files = e.clipboardData ? Array.from(e.clipboardData.files) : [];
    if (!files.length) return;
    if (!e.clipboardData.types.includes("text/plain")) e.preventDefault();
    stage(files);
  });

  // Dropping files on the conversation attaches them; anywhere else on the page, a dropped
  // file does nothing (the browser would leave the page to open it).
  function carriesFiles(e) {
    return Boolean(e.dataTransfer) && Array.from(e.dataTransfer.types || []).includes("Files");
  }

  let dragDepth = 0; // dragenter/dragleave pairs of the zone's children
  dropZone.addEventListener("dragenter", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    dragDepth += 1;
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", (e) => {
    if (!carriesFiles(e)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) dropZone.classList.remove("dragging");
  });
  dropZone.addEventListener("drop", (e) => {
    if (!carriesFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    dropZone.classList.remove("dragging");
    stage(e.dataTransfer.files);
  });
  for (const kind of ["dragover", "drop"]) {
    window.addEventListener(kind, (e) => {
      if (!carriesFiles(e)) return;
      e.preventDefault();
      if (kind === "dragover") e.dataTransfer.dropEffect = dropZone.contains(e.target) ? "copy" : "none";
    });
  }

  connect();
})();
