// Fan-out load generator: R rooms x N WebSocket clients, one sender per room at a fixed
// rate. Every client counts what it receives; prints one JSON summary on stdout.
//
//   node loadgen.mjs --url ws://127.0.0.1:8000/ws/chat/{room}/ --rooms 2 --clients 50 \
//        --rate 10 --duration 10 [--origin http://127.0.0.1:8000] [--connect-rate 500] \
//        [--storm] [--idle 10] [--drain 3]
//
// Connects go one after another, or with --storm on a fixed schedule (connect k starts at
// k / connect-rate, without waiting for the ones before: a connect storm). With --phases,
// a JSON line on stderr marks each phase ("connected" after the connects and a second of
// settling, "idle" after --idle seconds of holding the sockets quiet, "sending" when the
// measured messages start, "sent" when the last is due, before the drain), so the caller
// can read the server's CPU and memory at each. Before "sending", one uncounted message
// per room warms each server up.
//
// Message text is JSON {r: room, s: seq, t: send time in ms}, so any server that relays a
// {"message": ...} object (the Channels tutorial, the floor, the gateway) can be measured.
import WebSocket from "ws";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const rooms = parseInt(args.rooms ?? "2", 10);
const perRoom = parseInt(args.clients ?? "50", 10);
const rate = parseFloat(args.rate ?? "10");
const duration = parseFloat(args.duration ?? "10");
const drain = parseFloat(args.drain ?? "3");
const connectRate = parseFloat(args["connect-rate"] ?? "1000");
const origin = args.origin;
const storm = "storm" in args;
const idle = parseFloat(args.idle ?? "0");
const phases = "phases" in args;
const phase = (name) => { if (phases) process.stderr.write(JSON.stringify({ phase: name }) + "\n"); };
const now = () => performance.timeOrigin + performance.now();

function connect(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { origin, perMessageDeflate: false });
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

let measureFrom = Infinity; // latencies count only for messages sent in the run
const clients = []; // {room, ws, stats}
const connectTimes = []; // ms from a connect's start to its open
let connectFailures = 0;
const connectStart = now();

async function open(r, c) {
  const room = `bench${r}`;
  const url = args.url.replace("{room}", room) + (args.url.includes("?") ? "&" : "?") + `uid=bench-${r}-${c}-client`;
  const stats = { received: 0, unique: new Set(), dups: 0, reordered: 0, last: 0, latencies: [] };
  const started = now();
  try {
    const ws = await connect(url);
    connectTimes.push(now() - started);
    ws.on("message", (data) => {
      const t = now();
      let frame;
      try { frame = JSON.parse(data); } catch { return; }
      if (typeof frame.message !== "string" || frame.message[0] !== "{") return;
      const m = JSON.parse(frame.message);
      if (m.w) return; // a warm-up message, not counted
      stats.received++;
      if (stats.unique.has(m.s)) { stats.dups++; return; }
      stats.unique.add(m.s);
      if (m.s < stats.last) stats.reordered++;
      stats.last = Math.max(stats.last, m.s);
      if (m.t >= measureFrom) stats.latencies.push(t - m.t);
    });
    ws.on("error", () => {});
    clients.push({ room, ws, stats });
  } catch (err) {
    connectFailures++;
  }
}

const pending = [];
let k = 0;
for (let r = 0; r < rooms; r++) {
  for (let c = 0; c < perRoom; c++) {
    if (storm) {
      const due = connectStart + (k++ * 1000) / connectRate;
      const wait = due - now();
      if (wait > 1) await new Promise((res) => setTimeout(res, wait));
      pending.push(open(r, c));
    } else {
      await open(r, c);
      if (connectRate > 0) await new Promise((res) => setTimeout(res, 1000 / connectRate));
    }
  }
}
await Promise.all(pending);
const connectSeconds = (now() - connectStart) / 1000;
await new Promise((res) => setTimeout(res, 1000)); // settle
phase("connected");
if (rate > 0) {
  // One message per room first, not counted: what a server does once (a room's first
  // message, lazy set-up) is not charged to the measured ones.
  for (let r = 0; r < rooms; r++) {
    const first = clients.find((c) => c.room === `bench${r}`);
    if (first) first.ws.send(JSON.stringify({ message: JSON.stringify({ r, w: 1, t: now() }) }));
  }
  await new Promise((res) => setTimeout(res, 1000));
}
if (idle > 0) {
  await new Promise((res) => setTimeout(res, idle * 1000));
  phase("idle");
}

// One sender per room: the room's first client.
const senders = [];
const sent = new Array(rooms).fill(0);
measureFrom = now();
const sendStart = now();
for (let r = 0; r < rooms; r++) {
  const sender = clients.find((c) => c.room === `bench${r}`);
  if (!sender) continue;
  const total = Math.round(rate * duration);
  // Drift-free schedule: message k goes at start + k/rate.
  const tick = () => {
    const due = Math.min(total, Math.floor(((now() - sendStart) / 1000) * rate) + 1);
    while (sent[r] < due) {
      sent[r]++;
      sender.ws.send(JSON.stringify({ message: JSON.stringify({ r, s: sent[r], t: now() }) }));
    }
    if (sent[r] < total) setTimeout(tick, Math.max(1, 1000 / rate / 2));
  };
  senders.push(tick);
}
phase("sending");
senders.forEach((tick) => tick());
await new Promise((res) => setTimeout(res, duration * 1000));
phase("sent");
await new Promise((res) => setTimeout(res, drain * 1000));

let expected = 0, received = 0, unique = 0, dups = 0, reordered = 0;
const latencies = [];
for (const { room, ws, stats } of clients) {
  const r = parseInt(room.slice(5), 10);
  expected += sent[r];
  received += stats.received;
  unique += stats.unique.size;
  dups += stats.dups;
  reordered += stats.reordered;
  for (const l of stats.latencies) latencies.push(l);
  ws.terminate();
}
latencies.sort((a, b) => a - b);
connectTimes.sort((a, b) => a - b);
const pick = (xs, p) => (xs.length ? xs[Math.min(xs.length - 1, Math.floor(p * xs.length))] : null);
const pct = (p) => pick(latencies, p);
console.log(JSON.stringify({
  rooms, clients_per_room: perRoom, rate_per_room: rate, duration,
  connected: clients.length, connect_failures: connectFailures, connect_seconds: connectSeconds,
  sent: sent.reduce((a, b) => a + b, 0), expected, received, unique,
  lost: expected - unique, duplicates: dups, reordered,
  p50_ms: pct(0.5), p99_ms: pct(0.99), max_ms: latencies.length ? latencies[latencies.length - 1] : null,
  connect_p50_ms: pick(connectTimes, 0.5), connect_p99_ms: pick(connectTimes, 0.99),
}));
process.exit(0);
