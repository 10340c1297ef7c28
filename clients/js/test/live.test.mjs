// The SDK against the real local stack, through the edge (nginx with the
// production routing): sends, idempotent retries, history, live delivery both
// ways, a socket break caught up with history + `since` (each message once, in
// order), token expiry (4003) with a fresh token, removal from a group (4004),
// and a purchase notification. Started by tests/web/run.sh, which sets
// CHATFLEET_EDGE_URL; skipped without a stack.
import test from "node:test";
import assert from "node:assert/strict";
import { ChatfleetClient } from "../src/chatfleet.js";
import { EDGE, token, uniqueUser, eventually, script } from "./stack.mjs";

const skip = !EDGE || typeof WebSocket === "undefined" ? "no stack (run tests/web/run.sh) or no WebSocket (node --experimental-websocket)" : false;

function clientFor(user, { ttl = 3600, onToken } = {}) {
  return new ChatfleetClient({
    baseUrl: EDGE,
    getToken: ({ forceRefresh }) => {
      onToken?.(forceRefresh);
      return token(user, ttl);
    },
    reconnect: { baseMs: 200, maxMs: 2000 },
  });
}

const ids = (conv) => conv.messages.map((m) => m.content);

test("send, retry with the same client_message_id, history through the edge", { skip }, async () => {
  const [alice, bob] = [uniqueUser("alice"), uniqueUser("bob")];
  const a = clientFor(alice);
  const first = await a.sendMessage({ to: bob, content: "hello", clientMessageId: "c-1" });
  const again = await a.sendMessage({ to: bob, content: "hello", clientMessageId: "c-1" });
  assert.equal(again.message_id, first.message_id, "a retried send is stored once");
  const page = await clientFor(bob).history({ peerId: alice, before: "newest" });
  assert.deepEqual(page.messages.map((m) => m.message_id), [first.message_id]);
  const inbox = await clientFor(bob).conversations();
  const entry = inbox.conversations.find((c) => c.peer_id === alice);
  assert.equal(entry.unread_count, 1);
  const marked = await clientFor(bob).markRead(entry.conversation_id, first.message_id);
  assert.equal(marked.unread_count, 0);
});

test("live both ways, typing, read markers, and a break caught up once and in order", { skip }, async () => {
  const [alice, bob] = [uniqueUser("alice"), uniqueUser("bob")];
  const a = clientFor(alice).openConversation({ peerId: bob });
  const b = clientFor(bob).openConversation({ peerId: alice });
  try {
    await a.start();
    await b.start();
    await eventually(() => a.state === "live" && b.state === "live", { what: "both sockets live" });
    await eventually(() => a.online.has(bob), { what: "alice sees bob present" });

    const typing = [];
    a.on("typing", (t) => typing.push(t));
    b.typing();
    await eventually(() => typing.some((t) => t.userId === bob && t.typing), { what: "typing start" });

    await a.send("a1");
    await b.send("b1");
    await eventually(() => ids(a).join() === "a1,b1" && ids(b).join() === "a1,b1", { what: "both see a1,b1" });

    // (Sending moved bob's own marker past a1: the marker moves, and is announced,
    // when he reads something newer than his last message.)
    const reads = [];
    a.on("read", (r) => reads.push(r));
    const a2 = await a.send("a2");
    await eventually(() => ids(b).includes("a2"), { what: "bob sees a2" });
    const marked = await b.markRead();
    assert.equal(marked.moved, true);
    await eventually(() => reads.some((r) => r.userId === bob && r.upTo === a2.message_id), {
      what: `alice sees bob's read marker (got ${JSON.stringify(reads)})`,
    });

    // Break alice's socket as a resync would (the client may close with 4000-4999):
    // she catches up from history, reconnects with `since`, and shows each once.
    const states = [];
    a.on("state", ({ state }) => states.push(state));
    a.ws.close(4000, "test resync");
    const sends = [];
    for (let i = 2; i <= 6; i++) sends.push(await b.send(`b${i}`));
    await eventually(() => a.state === "live" && ids(a).length === 8, { what: "alice caught up", timeoutMs: 20000 });
    assert.ok(states.includes("reconnecting"), `states: ${states}`);
    await b.send("b7");
    const want = "a1,b1,a2,b2,b3,b4,b5,b6,b7";
    await eventually(() => ids(a).join() === want && ids(b).join() === want, { what: `both show ${want}` });
    assert.equal(new Set(a.messages.map((m) => m.message_id)).size, 9, "no duplicate");

    // An edit and a deletion reach the other side.
    const deleted = [];
    a.on("delete", ({ message }) => deleted.push(message.message_id));
    await b.edit(sends[0].message_id, "b2 (edited)");
    await b.delete(sends[1].message_id);
    await eventually(() => deleted.includes(sends[1].message_id), { what: "alice sees the deletion" });
    await eventually(() => a.messages.find((m) => m.message_id === sends[0].message_id)?.content === "b2 (edited)", {
      what: "alice sees the edit",
    });
  } finally {
    a.close();
    b.close();
  }
});

test("token expiry (4003): a fresh token and a reconnect with since, nothing lost", { skip }, async () => {
  const [alice, bob] = [uniqueUser("alice"), uniqueUser("bob")];
  const refreshes = [];
  // Tokens live 4 s: the server closes the socket with 4003 at their exp.
  const a = clientFor(alice, { ttl: 4, onToken: (force) => force && refreshes.push(Date.now()) }).openConversation({ peerId: bob });
  const b = clientFor(bob);
  const codes = [];
  a.on("close", ({ code }) => codes.push(code));
  try {
    await a.start();
    await eventually(() => a.state === "live", { what: "alice live" });
    await eventually(() => codes.includes(4003), { what: "a 4003 close", timeoutMs: 10000 });
    await b.sendMessage({ to: alice, content: "during" });
    await eventually(() => a.state === "live" && ids(a).includes("during"), { what: "alice back with the message" });
    assert.ok(refreshes.length >= 1, "asked for a fresh token");
  } finally {
    a.close();
  }
});

test("removed from a group (4004): the conversation stops and does not reconnect", { skip }, async () => {
  const [alice, bob] = [uniqueUser("alice"), uniqueUser("bob")];
  const ca = clientFor(alice);
  const group = await ca.createGroup({ title: "sdk test", members: [bob] });
  const b = clientFor(bob).openConversation({ conversationId: group.conversation_id });
  const removed = [];
  b.on("removed", (r) => removed.push(r));
  try {
    await b.start();
    await eventually(() => b.state === "live", { what: "bob live in the group" });
    await ca.sendMessage({ conversationId: group.conversation_id, content: "welcome" });
    await eventually(() => ids(b).includes("welcome"), { what: "bob sees the group message" });
    await ca.removeMember(group.conversation_id, bob);
    await eventually(() => b.state === "removed", { what: "bob removed" });
    assert.equal(removed.length, 1);
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal(b.state, "removed", "no reconnect after 4004");
  } finally {
    b.close();
  }
});

test("a purchase reaches the user's notification socket once", { skip }, async () => {
  const bob = uniqueUser("bob");
  const n = clientFor(bob).openNotifications();
  const got = [];
  n.on("notification", ({ notification }) => got.push(notification));
  try {
    await n.start();
    await eventually(() => n.state === "live", { what: "notifications live" });
    await script("create-event.sh", "purchase", bob, "paid");
    await eventually(() => got.some((x) => x.kind === "purchase"), { what: "the purchase notification", timeoutMs: 20000 });
  } finally {
    n.close();
  }
});
