// The SDK's pure logic: backoff, Retry-After, ids, token claims, the retry policy
// of request() (with a scripted fetch: what a 429, a 503 and a dropped connection
// look like to it), and the conversation's deduplication and `since` cursor. What
// crosses the network is tested against the real stack in live.test.mjs.
import test from "node:test";
import assert from "node:assert/strict";
import {
  backoffDelay,
  parseRetryAfter,
  compareIds,
  tokenClaims,
  streamIdFor,
  newClientMessageId,
  ChatfleetClient,
  ChatfleetError,
} from "../src/chatfleet.js";

const fakeToken = (claims) =>
  ["e30", Buffer.from(JSON.stringify(claims)).toString("base64url"), "sig"].join(".");

test("backoff doubles from the base up to the cap, with jitter in [cap/2, cap]", () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    const cap = Math.min(30000, 500 * 2 ** attempt);
    assert.equal(backoffDelay(attempt, { random: () => 0 }), cap / 2);
    assert.equal(backoffDelay(attempt, { random: () => 1 }), cap);
  }
  assert.equal(backoffDelay(1000, { random: () => 1 }), 30000, "no overflow for huge attempts");
});

test("Retry-After in seconds or as an HTTP date", () => {
  assert.equal(parseRetryAfter("2"), 2000);
  assert.equal(parseRetryAfter("0.5"), 500);
  assert.equal(parseRetryAfter(null), null);
  assert.equal(parseRetryAfter("soon"), null);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:03 GMT", now), 3000);
});

test("the pair id matches the documented example and ignores the order", async () => {
  assert.equal(await streamIdFor("alice", "bob"), "884a452152d3bf048cc051df8f708aff");
  assert.equal(await streamIdFor("bob", "alice"), "884a452152d3bf048cc051df8f708aff");
  assert.notEqual(await streamIdFor("a", "bc"), await streamIdFor("ab", "c"));
});

test("ids compare by creation (UUIDv7 text order); client ids are unique", () => {
  assert.equal(compareIds("0192f1a4-7b3c-7d2e-8f10-1a2b3c4d5e6f", "0192f1a4-7b3d-7000-8000-000000000000"), -1);
  assert.equal(compareIds("b", "b"), 0);
  const ids = new Set(Array.from({ length: 100 }, newClientMessageId));
  assert.equal(ids.size, 100);
});

test("token claims and expiry", () => {
  const t = fakeToken({ sub: "alice", exp: 100 });
  assert.deepEqual(tokenClaims(t), { sub: "alice", exp: 100 });
  assert.equal(tokenClaims("garbage"), null);
  assert.equal(ChatfleetClient.expired(t, 100_001), true);
  assert.equal(ChatfleetClient.expired(t, 99_000), false);
});

/** A fetch that answers from a script and records the calls. */
function scriptedFetch(answers) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const next = answers.shift();
    if (!next) throw new Error("unexpected call");
    if (next === "network") throw new TypeError("fetch failed");
    const headers = new Headers(next.headers ?? {});
    return new Response(next.body === undefined ? null : JSON.stringify(next.body), { status: next.status, headers });
  };
  return { fetch, calls };
}

function client(fetch, extra = {}) {
  return new ChatfleetClient({
    baseUrl: "http://edge.test",
    getToken: () => fakeToken({ sub: "alice", exp: 4_000_000_000 }),
    fetch,
    retry: { attempts: 4, baseMs: 1, maxMs: 50 },
    ...extra,
  });
}

test("a send is retried after a network error, 503 and 429 with the same client_message_id", async () => {
  const stored = { message_id: "m1", content: "hi" };
  const { fetch, calls } = scriptedFetch([
    "network",
    { status: 503, headers: { "retry-after": "0" }, body: { error: { code: "unavailable", message: "db" } } },
    { status: 429, headers: { "retry-after": "0.01" }, body: { error: { code: "rate_limited", message: "slow" } } },
    { status: 201, body: stored },
  ]);
  const sent = await client(fetch).sendMessage({ to: "bob", content: "hi", clientMessageId: "c-fixed" });
  assert.deepEqual(sent, stored);
  assert.equal(calls.length, 4);
  for (const call of calls) {
    assert.equal(JSON.parse(call.init.body).client_message_id, "c-fixed");
    assert.equal(call.init.headers.Authorization.startsWith("Bearer "), true);
  }
});

test("retries are bounded, a long Retry-After is not waited for, and a 4xx is not retried", async () => {
  const busy = { status: 503, body: { error: { code: "unavailable", message: "down" } } };
  let { fetch, calls } = scriptedFetch([busy, busy, busy, busy, busy]);
  await assert.rejects(client(fetch).history({ peerId: "bob" }), (e) => e instanceof ChatfleetError && e.status === 503);
  assert.equal(calls.length, 4, "attempts bound the retries");

  ({ fetch, calls } = scriptedFetch([{ status: 429, headers: { "retry-after": "120" }, body: {} }]));
  await assert.rejects(client(fetch).history({ peerId: "bob" }), (e) => e.status === 429 && e.retryAfterMs === 120000);
  assert.equal(calls.length, 1);

  ({ fetch, calls } = scriptedFetch([{ status: 403, body: { error: { code: "forbidden", message: "no" } } }]));
  await assert.rejects(client(fetch).editMessage("m1", "x"), (e) => e.code === "forbidden");
  assert.equal(calls.length, 1);
});

test("a group is not created twice: no retry after a dropped connection, only after 429", async () => {
  let { fetch, calls } = scriptedFetch(["network"]);
  await assert.rejects(client(fetch).createGroup({ title: "t" }), (e) => e.code === "network");
  assert.equal(calls.length, 1);
  ({ fetch, calls } = scriptedFetch([{ status: 503, body: {} }]));
  await assert.rejects(client(fetch).createGroup({ title: "t" }), (e) => e.status === 503);
  assert.equal(calls.length, 1);
});

test("a 401 asks for a fresh token once", async () => {
  const asked = [];
  const { fetch, calls } = scriptedFetch([{ status: 401, body: {} }, { status: 200, body: { conversations: [] } }]);
  const c = client(fetch, {
    getToken: ({ forceRefresh }) => {
      asked.push(forceRefresh);
      return fakeToken({ sub: "alice", exp: 4_000_000_000, n: asked.length });
    },
  });
  await c.conversations();
  assert.equal(calls.length, 2);
  assert.deepEqual(asked, [false, true]);
});

test("conversation: each message once, in order; only the conversation's own deliveries move `since`", async () => {
  const c = client(scriptedFetch([]).fetch);
  await c.token();
  const conv = c.openConversation({ peerId: "bob" });
  const seen = [];
  conv.on("message", ({ message }) => seen.push(message.message_id));
  const m = (id, extra = {}) => ({ message_id: id, sender_id: "bob", receiver_id: "alice", content: id, ...extra });

  conv.ingest(m("01"), "history");
  conv.ingest(m("02"), "history");
  assert.equal(conv.cursor, "02");
  // Our own send is shown at once but must not move the cursor past what the
  // socket has not delivered yet (03 may still be on its way).
  conv.ingest(m("04", { sender_id: "alice" }), "sent");
  assert.equal(conv.cursor, "02");
  conv.frame({ type: "message", message: m("03") });
  conv.frame({ type: "message", message: m("04", { sender_id: "alice" }) });
  conv.frame({ type: "message", message: m("03") });
  conv.ingest(m("03"), "history");
  assert.deepEqual(seen, ["01", "02", "04", "03"]);
  assert.deepEqual(conv.messages.map((x) => x.message_id), ["01", "02", "03", "04"]);
  assert.equal(conv.cursor, "04");

  const deleted = [];
  conv.on("delete", ({ message }) => deleted.push(message.message_id));
  conv.frame({ type: "message_deleted", message: m("02", { content: "", deleted_at: "t", version: 2 }) });
  conv.frame({ type: "message_deleted", message: m("02", { content: "", deleted_at: "t", version: 2 }) });
  conv.frame({ type: "message_updated", message: m("02", { content: "back?", version: 3 }) });
  assert.deepEqual(deleted, ["02"], "a deletion is reported once and always wins");
  assert.deepEqual(conv.messages.map((x) => x.message_id), ["01", "03", "04"]);

  const updates = [];
  conv.on("update", ({ message }) => updates.push([message.message_id, message.content, message.reactions]));
  conv.frame({ type: "message_updated", message: m("03", { content: "edited", version: 2 }) });
  conv.frame({ type: "message_updated", message: m("03", { content: "stale", version: 1 }) });
  conv.frame({ type: "reaction_added", message_id: "03", user_id: "bob", emoji: "👍" });
  conv.frame({ type: "reaction_removed", message_id: "03", user_id: "bob", emoji: "👍" });
  assert.deepEqual(updates, [
    ["03", "edited", undefined],
    ["03", "edited", { "👍": 1 }],
    ["03", "edited", {}],
  ]);
  conv.close();
});

test("events() yields every event in order and is bounded", async () => {
  const c = client(scriptedFetch([]).fetch);
  await c.token();
  const conv = c.openConversation({ peerId: "bob" });
  const it = conv.events();
  conv.frame({ type: "typing", user_id: "bob", state: "start" });
  conv.frame({ type: "read", user_id: "bob", up_to: "01" });
  assert.deepEqual((await it.next()).value, { type: "typing", userId: "bob", typing: true });
  assert.deepEqual((await it.next()).value, { type: "read", userId: "bob", upTo: "01" });
  for (let i = 0; i < 1001; i++) conv.frame({ type: "typing", user_id: "bob", state: "stop" });
  for (let i = 0; i < 1000; i++) await it.next();
  await assert.rejects(it.next(), (e) => e.code === "event_buffer_full");
  conv.close();
});

test("typing: at most one start per 2.5 s, a start typed before the socket opened is sent on open, stop on send", async () => {
  const c = client(scriptedFetch([]).fetch);
  await c.token();
  const conv = c.openConversation({ peerId: "bob" });
  const sent = [];
  conv.typing(); // no socket yet
  assert.equal(sent.length, 0);
  conv.ws = { readyState: 1, send: (text) => sent.push(JSON.parse(text)), close() {} };
  conv.opened();
  conv.typing();
  conv.typing();
  assert.deepEqual(sent, [{ type: "typing", state: "start" }]);
  conv.stopTyping();
  assert.deepEqual(sent.at(-1), { type: "typing", state: "stop" });
  conv.ws = null;
  conv.close();
});
