// The client against a real `roomcast dev` (the binary `scripts/test` builds; ROOMCAST_BIN
// overrides it), with `ws` as the WebSocket (Node 20), through Node's test runner.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { WebSocket } from "ws";
import { connect, AuthError, QueueFullError, JoinDeniedError, RateLimitedError, RoomcastError } from "../dist/index.js";
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const here = path.dirname(fileURLToPath(import.meta.url));
const binary = process.env.ROOMCAST_BIN ?? path.join(here, "../../../target/debug/roomcast");
const SECRET = "roomcast-dev-secret";

let dev;
let base;
let wsUrl;

/** Starts `roomcast dev` on a free port with `args`: the process and its URLs. */
async function startDev(args = []) {
  // The embedded store: no DynamoDB endpoint from the environment.
  const env = { ...process.env, RUST_LOG: "warn" };
  delete env.DYNAMODB_ENDPOINT_URL;
  delete env.ROOMCAST_JWT_SECRET; // the tokens below are signed with the dev default
  const proc = spawn(binary, ["dev", "--port", "0", ...args], {
    env,
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = createInterface({ input: proc.stdout });
  const found = {};
  await new Promise((resolve, reject) => {
    proc.once("exit", (code) => reject(new Error(`roomcast dev exited (${code})`)));
    lines.on("line", (line) => {
      const words = line.trim().split(/\s+/);
      if (words[0] === "websocket") found.wsUrl = words[1].split("?")[0];
      if (words[0] === "@connections") found.base = words[1].split("/local")[0];
      if (found.wsUrl && found.base) resolve();
    });
  });
  return { proc, ...found };
}

before(async () => {
  const started = await startDev();
  ({ proc: dev, wsUrl, base } = started);
});

after(() => dev?.kill());

function token(tenant, user, extra = {}) {
  const encode = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + 600;
  const signed = `${encode({ alg: "HS256", typ: "JWT" })}.${encode({ tenant, sub: user, exp, ...extra })}`;
  return `${signed}.${createHmac("sha256", SECRET).update(signed).digest("base64url")}`;
}

function client(tenant, user, rooms, options = {}) {
  return connect({
    url: wsUrl,
    token: () => token(tenant, user),
    rooms,
    WebSocket,
    initialBackoffMs: 100,
    maxBackoffMs: 400,
    ...options,
  });
}

/** Resolves once `check()` holds (polling), or fails after `ms`. */
async function until(what, check, ms = 10_000) {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Closes a connection as API Gateway would (its idle or 2-hour limit): the dev stack's
 * `@connections` DELETE. */
async function forceClose(connectionId) {
  // Connection ids are base64: a `/` in one must not split the path.
  const response = await fetch(`${base}/local/@connections/${encodeURIComponent(connectionId)}`, { method: "DELETE" });
  assert.ok(response.status === 204 || response.status === 200, `DELETE answered ${response.status}`);
}

test("a forced close and reconnect recovers every message sent meanwhile, in order, once", async () => {
  const room = `recover-${Date.now()}`;
  // Ann's reconnect waits until Bob has sent: what he sent meanwhile can only come by recovery.
  let sentMeanwhile;
  const meanwhile = new Promise((resolve) => (sentMeanwhile = resolve));
  let connects = 0;
  const ann = connect({
    url: wsUrl,
    token: async () => {
      connects += 1;
      if (connects > 1) await meanwhile;
      return token("acme", "ann");
    },
    rooms: [room],
    WebSocket,
    initialBackoffMs: 50,
    maxBackoffMs: 100,
  });
  const bob = client("acme", "bob", [room]);
  const got = [];
  const recoveries = [];
  const states = [];
  ann.on("message", (m) => got.push(m.message));
  ann.on("recovered", (r) => recoveries.push(r));
  ann.on("state", (s) => states.push(s));
  await Promise.all([ann.ready(), bob.ready()]);
  const sent = [];
  for (let i = 1; i <= 3; i++) {
    await bob.send(room, `m${i}`);
    sent.push(`m${i}`);
  }
  await until("the live messages", () => got.length === 3);

  const first = ann.connectionId;
  await forceClose(first);
  await until("the client to notice", () => ann.state !== "open");
  for (let i = 4; i <= 8; i++) {
    await bob.send(room, `m${i}`);
    sent.push(`m${i}`);
  }
  const before = got.length;
  sentMeanwhile();
  await until("the reconnect", () => ann.state === "open" && ann.connectionId !== first);
  await until("the recovery", () => recoveries.length === 1);
  assert.deepEqual(recoveries[0], { room, recovered: true });
  // Everything sent meanwhile had arrived by the time the recovery was reported.
  assert.equal(before, 3);
  assert.deepEqual(got.slice(0, 8), sent.slice(0, 8));
  for (let i = 9; i <= 10; i++) {
    await bob.send(room, `m${i}`);
    sent.push(`m${i}`);
  }
  await until("every message", () => got.length >= sent.length);
  // A later marker: anything duplicated would have arrived before it.
  await bob.send(room, "marker");
  await until("the marker", () => got.includes("marker"));
  assert.deepEqual(got, [...sent, "marker"]);
  assert.ok(states.includes("reconnecting"), states.join(","));
  ann.close();
  bob.close();
});

test("the roster after two users join and one leaves", async () => {
  const room = `roster-${Date.now()}`;
  const watcher = client("acme", "wendy", [room]);
  await watcher.ready();
  await until("the watcher's own presence", () => watcher.roster(room).some((u) => u.user_id === "wendy"));
  const u1 = client("acme", "uma", []);
  const u2 = client("acme", "ulf", []);
  await Promise.all([u1.ready(), u2.ready()]);
  const joined = await u1.join(room);
  assert.equal(joined.room, room);
  await u2.join(room);
  await until("both joined", () => watcher.roster(room).length === 3);
  await u2.leave(room);
  const roster = await until("the leave", () => {
    const r = watcher.roster(room).map((u) => u.user_id);
    return r.length === 2 && r;
  });
  assert.deepEqual(roster, ["uma", "wendy"]);
  assert.deepEqual((await watcher.who(room)).map((u) => u.user_id).sort(), ["uma", "wendy"]);
  for (const c of [watcher, u1, u2]) c.close();
});

test("requests in flight together each resolve to their own answer", async () => {
  const room = `flight-${Date.now()}`;
  const ann = client("acme", "ann", [room]);
  await ann.ready();
  const first = await ann.send(room, "first");
  const [a, b, c, page, who, side] = await Promise.all([
    ann.send(room, "a"),
    ann.send(room, "b"),
    ann.send(room, "c"),
    ann.history(room, { limit: 1 }),
    ann.who(room),
    ann.join(`${room}-side`),
  ]);
  assert.equal(new Set([a.id, b.id, c.id, first.id]).size, 4);
  assert.equal(page.room, room);
  assert.equal(page.messages.length, 1);
  assert.ok(page.next, "there are older messages");
  assert.deepEqual(who.map((u) => u.user_id), ["ann"]);
  assert.equal(side.room, `${room}-side`);
  // Backward and forward pages meet.
  const older = await ann.history(room, { before: page.next, limit: 10 });
  assert.deepEqual(older.messages.map((m) => m.message).slice(0, 1), ["first"]);
  const forward = await ann.history(room, { after: first.id, limit: 10 });
  assert.equal(forward.messages.length, 3);
  // The same idempotency key writes once.
  const once = await ann.send(room, "once", { idempotencyKey: "k-1" });
  const again = await ann.send(room, "once", { idempotencyKey: "k-1" });
  assert.equal(once.id, again.id);
  // An error answer is its own request's, typed.
  await assert.rejects(ann.history("not a room!"), (e) => e instanceof RoomcastError && e.code === "invalid_request");
  ann.close();
});

test("a refused token is an error, not a reconnect loop", async () => {
  let asked = 0;
  const states = [];
  const errors = [];
  const refused = connect({
    url: wsUrl,
    token: () => {
      asked += 1;
      return "not-a-token";
    },
    WebSocket,
    initialBackoffMs: 50,
  });
  refused.on("state", (s) => states.push(s));
  refused.on("error", (e) => errors.push(e));
  await assert.rejects(refused.ready(), (e) => e instanceof AuthError);
  assert.equal(refused.state, "closed");
  // Well past several backoffs: still one attempt.
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(asked, 1);
  assert.deepEqual(states, ["closed"]);
  assert.ok(errors[0] instanceof AuthError);
});

test("sends wait in a bounded queue while reconnecting", async () => {
  const room = `queue-${Date.now()}`;
  const ann = client("acme", "ann", [room], { maxQueuedSends: 2, initialBackoffMs: 300, maxBackoffMs: 300 });
  const got = [];
  ann.on("message", (m) => got.push(m.message));
  await ann.ready();
  await forceClose(ann.connectionId);
  await until("the client to notice", () => ann.state !== "open");
  const queued = [ann.send(room, "q1"), ann.send(room, "q2")];
  await assert.rejects(ann.send(room, "q3"), (e) => e instanceof QueueFullError);
  const ids = await Promise.all(queued);
  assert.equal(ids.length, 2);
  await until("the queued messages", () => got.length === 2);
  assert.deepEqual(got, ["q1", "q2"]);
  ann.close();
  await assert.rejects(ann.send(room, "after"), (e) => e instanceof RoomcastError && e.code === "closed");
});

test("a join the token's rooms claim refuses rejects with JoinDeniedError", async () => {
  const sue = connect({
    url: wsUrl,
    token: () => token("beta", "sue", { rooms: ["support-*"] }),
    rooms: ["support-1"],
    WebSocket,
  });
  await sue.ready();
  const denied = [];
  sue.on("join_denied", (e) => denied.push(e.room));
  await assert.rejects(sue.join("general"), (e) => e instanceof JoinDeniedError && e.room === "general");
  const ok = await sue.join("support-2");
  assert.equal(ok.room, "support-2");
  assert.deepEqual(denied, ["general"]);
  sue.close();
});

const run = promisify(execFile);

/** A WebSocket whose "server" is the test: it welcomes at once, then the test answers. */
class Scripted {
  static last;
  readyState = 0;
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;
  sent = [];
  constructor() {
    Scripted.last = this;
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.({});
      this.deliver({ action: "welcome", connection_id: "c1", tenant: "t", user_id: "ann", rooms: ["r"] });
    }, 0);
  }
  deliver(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {}
}


test("a join the tenant's rules decide: pending, then allowed or denied", async () => {
  const target = process.env.CARGO_TARGET_DIR ?? path.join(here, "../../../target");
  const acl = path.join(target, "wasm32-wasip2/release/roomcast_plugin_rooms_acl.wasm");
  const env = { ...process.env };
  delete env.DYNAMODB_ENDPOINT_URL;
  const cli = (...args) => run(binary, [...args, "--dev", base], { env });
  await cli("plugin", "config", "set", "--tenant", "gate", "room.vip=ann");
  await cli("plugin", "upload", "--tenant", "gate", "--policy", "closed", acl);
  // Active, and known to decide joins (what `$connect` reads to make joins wait).
  await until("the plugin's activation", async () => (await cli("plugin", "list", "--tenant", "gate")).stdout.includes("decides joins"));
  const ann = client("gate", "ann", ["lobby"]);
  const eve = client("gate", "eve", ["lobby"]);
  await Promise.all([ann.ready(), eve.ready()]);
  const ack = await ann.join("vip");
  assert.equal(ack.room, "vip");
  assert.deepEqual(ack.members.map((m) => m.user_id), ["ann"]);
  await assert.rejects(eve.join("vip"), (e) => e instanceof JoinDeniedError && /eve is not on the list/.test(e.reason));
  assert.ok(!eve.rooms.includes("vip"));
  ann.close();
  eve.close();
});

test("answers arriving out of order resolve their own requests (a scripted socket)", async () => {
  const c = connect({ url: "ws://scripted", token: "t", rooms: ["r"], WebSocket: Scripted });
  await c.ready();
  const requests = [c.send("r", "a"), c.send("r", "b"), c.history("r"), c.send("r", "c")];
  await until("the frames", () => Scripted.last.sent.filter((f) => f.action !== "who").length === 4);
  const asked = Scripted.last.sent.filter((f) => f.action !== "who");
  for (const frame of [...asked].reverse()) {
    if (frame.action === "history") Scripted.last.deliver({ action: "history", room: "r", messages: [], ref: frame.ref });
    else Scripted.last.deliver({ action: "ack", request: "sendMessage", room: "r", id: `id-${frame.message}`, ref: frame.ref });
  }
  const [a, b, h, cc] = await Promise.all(requests);
  assert.deepEqual([a.id, b.id, h.messages, cc.id], ["id-a", "id-b", [], "id-c"]);
  c.close();
});

test("a roster snapshot that left before a presence event does not undo it (a scripted socket)", async () => {
  const c = connect({ url: "ws://scripted", token: "t", rooms: ["r"], WebSocket: Scripted });
  await c.ready();
  await until("the welcome's who", () => Scripted.last.sent.some((f) => f.action === "who"));
  const who = Scripted.last.sent.find((f) => f.action === "who");
  // Uma joins while the snapshot is on its way; the snapshot does not know her yet.
  Scripted.last.deliver({ action: "presence", id: "p1", room: "r", user_id: "uma", event: "joined", reason: "join", users: 2 });
  Scripted.last.deliver({ action: "who", room: "r", users: [{ user_id: "ann", connections: 1 }], total: 1, ref: who.ref });
  await until("the snapshot", () => c.roster("r").some((u) => u.user_id === "ann"));
  assert.deepEqual(c.roster("r").map((u) => u.user_id), ["ann", "uma"]);
  assert.equal(c.count("r"), 2);
  c.close();
});

test("a presence event older than one applied is dropped: two shards' frames out of order (a scripted socket)", async () => {
  const c = connect({ url: "ws://scripted", token: "t", rooms: ["r"], WebSocket: Scripted });
  await c.ready();
  const told = [];
  c.on("presence", (e) => told.push(`${e.event}@${e.version}`));
  const frame = (id, event, version, users) => ({ action: "presence", id, room: "r", user_id: "uma", event, reason: "join", users, version });
  // Uma joined (1), left (2) and joined again (3); the left arrives last.
  Scripted.last.deliver(frame("p1", "joined", 1, 1));
  Scripted.last.deliver(frame("p3", "joined", 3, 1));
  Scripted.last.deliver(frame("p2", "left", 2, 0));
  await until("three frames handled", () => c.stalePresenceDropped === 1);
  assert.deepEqual(told, ["joined@1", "joined@3"]);
  assert.deepEqual(c.roster("r").map((u) => u.user_id), ["uma"], "the late left does not undo the later join");
  c.close();
});

test("a presence event older than a roster snapshot is dropped (a scripted socket)", async () => {
  const c = connect({ url: "ws://scripted", token: "t", rooms: ["r"], WebSocket: Scripted });
  await c.ready();
  await until("the welcome's who", () => Scripted.last.sent.some((f) => f.action === "who"));
  const who = Scripted.last.sent.find((f) => f.action === "who");
  // The snapshot shows Uma present since her `joined` of version 5.
  Scripted.last.deliver({ action: "who", room: "r", users: [{ user_id: "uma", connections: 1, version: 5 }], total: 1, ref: who.ref });
  await until("the snapshot", () => c.roster("r").some((u) => u.user_id === "uma"));
  // A `left` of version 4, from the other shard, arrives late: older than the snapshot.
  Scripted.last.deliver({ action: "presence", id: "p4", room: "r", user_id: "uma", event: "left", reason: "leave", users: 0, version: 4 });
  await until("the late frame handled", () => c.stalePresenceDropped === 1);
  assert.deepEqual(c.roster("r").map((u) => u.user_id), ["uma"], "the older left does not undo the newer snapshot");
  c.close();
});

test("a burst over the rate limit is paced and waits as the server says: every send resolves and arrives", async () => {
  // The dev stack's default limit: 10 messages a second per connection, and a connection that
  // reaches 30 in a second is closed. 40 at once would be; paced, they all go through.
  const room = `burst-${Date.now()}`;
  const burst = client("acme", "burst", [room]);
  const reader = client("acme", "reader", [room]);
  const got = [];
  const states = [];
  reader.on("message", (m) => got.push(m.message));
  burst.on("state", (s) => states.push(s));
  await Promise.all([burst.ready(), reader.ready()]);
  const first = burst.connectionId;
  const sent = Array.from({ length: 40 }, (_, i) => `b${i}`);
  const answers = await Promise.all(sent.map((text) => burst.send(room, text)));
  assert.equal(new Set(answers.map((a) => a.id)).size, 40, "each send has its own id");
  assert.ok(burst.rateLimited > 0, "some were refused and sent again");
  await until("every message", () => got.length >= 40, 20_000);
  assert.deepEqual([...got].sort(), [...sent].sort());
  assert.equal(burst.state, "open", "a client that waits as told is not closed");
  assert.equal(burst.connectionId, first, `never reconnected: ${states.join(",")}`);
  burst.close();
  reader.close();
});

test("rate_limited past maxRateLimitRetries rejects with RateLimitedError (a scripted socket)", async () => {
  const c = connect({ url: "ws://scripted", token: "t", rooms: ["r"], WebSocket: Scripted, maxRateLimitRetries: 1 });
  await c.ready();
  const sends = () => Scripted.last.sent.filter((f) => f.action === "sendMessage");
  const sending = c.send("r", "hi");
  const refuse = (frame) =>
    Scripted.last.deliver({ action: "error", code: "rate_limited", message: "at most 10", retry_after_ms: 20, ref: frame.ref });
  await until("the send", () => sends().length === 1);
  refuse(sends()[0]);
  // Sent again after the wait, with a new ref; refused again: given up.
  await until("the send again", () => sends().length === 2);
  assert.notEqual(sends()[1].ref, sends()[0].ref);
  refuse(sends()[1]);
  await assert.rejects(sending, (e) => e instanceof RateLimitedError && e.retryAfterMs === 20);
  assert.equal(c.rateLimited, 2);
  c.close();
});

test("a token about to expire is refreshed in place: sends go on, on the same connection", async () => {
  const room = `refresh-${Date.now()}`;
  // Tokens that live 4 s, refreshed 2.5 s before they expire: about every 1.5 s.
  const ann = client("acme", "ann", [room], {
    token: () => token("acme", "ann", { exp: Math.floor(Date.now() / 1000) + 4 }),
    refreshBeforeMs: 2500,
  });
  const errors = [];
  ann.on("error", (e) => errors.push(e.code));
  await ann.ready();
  const first = ann.connectionId;
  const got = [];
  ann.on("message", (m) => got.push(m.message));
  // Past two of the tokens' lifetimes: every send is accepted (no token_expired).
  const sent = [];
  const end = Date.now() + 9000;
  for (let i = 0; Date.now() < end; i++) {
    await ann.send(room, `s${i}`);
    sent.push(`s${i}`);
    await new Promise((r) => setTimeout(r, 300));
  }
  await until("every message", () => got.length >= sent.length);
  assert.deepEqual(got, sent);
  assert.ok(ann.tokensRefreshed >= 3, `refreshed ${ann.tokensRefreshed} times`);
  assert.equal(ann.connectionId, first, "refreshed in place, never reconnected");
  assert.deepEqual(errors, []);
  ann.close();
});

test("a connection is replaced before the maximum connection duration, recovering with since: nothing lost or twice", async () => {
  // A second dev stack whose connections last 3 s (API Gateway's is two hours).
  const short = await startDev(["--max-connection", "3"]);
  try {
    const room = `rollover-${Date.now()}`;
    const options = { url: short.wsUrl, WebSocket, initialBackoffMs: 50, maxBackoffMs: 100 };
    const ann = connect({ ...options, token: () => token("acme", "ann"), rooms: [room], maxConnectionMs: 1500 });
    const bob = connect({ ...options, token: () => token("acme", "bob"), rooms: [room] });
    const got = [];
    ann.on("message", (m) => got.push(m.message));
    await Promise.all([ann.ready(), bob.ready()]);
    const ids = new Set([ann.connectionId]);
    ann.on("welcome", (w) => ids.add(w.connection_id));
    const sent = [];
    const end = Date.now() + 5000;
    for (let i = 0; Date.now() < end; i++) {
      // Bob's own connection is closed at 3 s: his sends wait for his reconnect (and a send
      // in flight then is sent again under its idempotency key: written once).
      await bob.send(room, `b${i}`);
      sent.push(`b${i}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    await until("ann's replacements", () => ann.connectionsReplaced >= 2);
    await bob.ready();
    await bob.send(room, "marker");
    await until("the marker", () => got.includes("marker"));
    // Every message Bob's sends were acknowledged for, in order, once, across ann's connections.
    assert.deepEqual(got, [...sent, "marker"]);
    assert.ok(ids.size >= 3, `ann's connections: ${[...ids].join(",")}`);
    ann.close();
    bob.close();
  } finally {
    short.proc.kill();
  }
});

test("a user the backend disconnects is told terminated and the client ends, no reconnect", async () => {
  const room = `terminated-${Date.now()}`;
  const ann = client("acme", "ann", [room]);
  const errors = [];
  ann.on("error", (e) => errors.push(e.code));
  await ann.ready();
  const response = await fetch(`${base}/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${token("acme", "backend", { scope: "users" })}` },
    body: JSON.stringify({ action: "disconnect_user", tenant: "acme", user_id: "ann" }),
  });
  assert.equal(response.status, 200, await response.clone().text());
  assert.deepEqual(await response.json(), { disconnected: 1 });
  await until("the client to end", () => ann.state === "closed");
  assert.ok(errors.includes("terminated"), errors.join(","));
  await assert.rejects(ann.ready(), /closed/);
});

test("a backend's message to a user reaches each of their clients once, in any room or none", async () => {
  const user = `zoe-${Date.now()}`;
  const inRoom = client("acme", user, [`inbox-${Date.now()}`]);
  const noRoom = client("acme", user, []);
  const got = [[], []];
  inRoom.on("userMessage", (m) => got[0].push(m));
  noRoom.on("userMessage", (m) => got[1].push(m));
  await Promise.all([inRoom.ready(), noRoom.ready()]);
  const response = await fetch(`${base}/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${token("acme", "backend", { scope: "users" })}` },
    body: JSON.stringify({ action: "send_to_user", tenant: "acme", user_id: user, message: "paid", from: "billing" }),
  });
  assert.equal(response.status, 200, await response.clone().text());
  const { id, connections } = await response.json();
  assert.equal(connections, 2);
  await until("both clients", () => got[0].length === 1 && got[1].length === 1);
  for (const [m] of got) assert.deepEqual([m.id, m.from, m.message], [id, "billing", "paid"]);
  inRoom.close();
  noRoom.close();
});

test("a redelivered user message is emitted once (a scripted socket)", async () => {
  const c = connect({ url: "ws://scripted", token: "t", rooms: [], WebSocket: Scripted });
  await c.ready();
  const got = [];
  c.on("userMessage", (m) => got.push(m.message));
  const frame = { action: "user_message", id: "u-1", from: "backend", message: "once", timestamp: "t" };
  Scripted.last.deliver(frame);
  Scripted.last.deliver(frame);
  Scripted.last.deliver({ ...frame, id: "u-2", message: "twice" });
  // The scripted socket delivers at once: the events have been emitted (or not) by now.
  assert.deepEqual(got, ["once", "twice"]);
  c.close();
});

test("a room the backend takes the user out of is forgotten: the reconnect does not rejoin it", async () => {
  const user = `lea-${Date.now()}`;
  const [keep, drop] = [`keep-${Date.now()}`, `drop-${Date.now()}`];
  const c = client("acme", user, [keep, drop]);
  const left = [];
  c.on("left", (room) => left.push(room));
  const welcomes = [];
  c.on("welcome", (w) => welcomes.push(w));
  await c.ready();
  const response = await fetch(`${base}/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${token("acme", "backend", { scope: "users" })}` },
    body: JSON.stringify({ action: "leave_user", tenant: "acme", user_id: user, room: drop }),
  });
  assert.equal(response.status, 200, await response.clone().text());
  await until("the left event", () => left.includes(drop));
  assert.deepEqual(c.rooms, [keep]);
  await forceClose(welcomes[welcomes.length - 1].connection_id);
  await until("the reconnect's welcome", () => welcomes.length === 2);
  assert.deepEqual(welcomes[1].rooms, [keep], "the reconnect asked for the room it still has only");
  c.close();
});
