// The web app in a real browser (Debian chromium via chromium-driver), two users
// in two browsers of their own, through the local edge that deploy/local/up.sh
// started (tests/web/run.sh): sign in with the link up.sh prints, start a
// conversation, messages both ways, typing and read receipts; the chat socket
// service killed mid-conversation (the pages say "reconnecting…", up.sh starts it
// again, every message is on both screens exactly once, in order); a purchase in
// the bell; a deleted message disappearing on the other screen; phone width.
// Screenshots go to $WEB_TEST_ARTIFACTS.
import test from "node:test";
import assert from "node:assert/strict";
import { readFileSync, mkdirSync } from "node:fs";
import path from "node:path";
import { Driver } from "./webdriver.mjs";
import { EDGE, token, script } from "../../clients/js/test/stack.mjs";

const skip = !EDGE ? "no stack (run tests/web/run.sh)" : false;
const ARTIFACTS = process.env.WEB_TEST_ARTIFACTS ?? path.resolve("target/web-test");
const STACK_DIR = process.env.STACK_DIR;

// Page-side probes (run inside the browser).
const messagesOnScreen = () => [...document.querySelectorAll("#messages li.message .content")].map((n) => n.textContent);
const statusText = () => document.getElementById("conn-status").textContent;

test("two users chat in two browsers through the local edge", { skip, timeout: 300000 }, async (t) => {
  mkdirSync(ARTIFACTS, { recursive: true });
  const shot = (session, name) => session.screenshot(path.join(ARTIFACTS, `${name}.png`));
  const driver = await Driver.start();
  t.after(() => driver.stop());
  const alice = await driver.session();
  const bob = await driver.session();
  const expected = [];

  // Sends and waits until the sender's own screen shows it (the POST answered): the
  // order of `expected` is then the order the server stored them in (ids sort by
  // creation), which is the order every screen must show.
  const sendFrom = async (session, text, typed = text) => {
    await session.type("#composer", typed);
    await session.click("#send");
    await session.waitFor(
      (want) => [...document.querySelectorAll("#messages li.mine .content")].some((n) => n.textContent === want),
      [text],
      { what: `the sender's screen to show ${JSON.stringify(text)}` },
    );
    expected.push(text);
  };
  const openChatWith = async (session, peer) => {
    const css = `#conversation-list li[data-peer="${peer}"]`;
    await session.waitFor((sel) => !!document.querySelector(sel), [css], { what: `${peer} in the conversation list` });
    await session.click(css);
    // Live: typing frames are only sent on an open socket (they are ephemeral).
    await session.waitFor(
      () => !document.getElementById("conversation").hidden && document.getElementById("conn-status").textContent === "live",
      [],
      { what: "the conversation open and live" },
    );
  };
  const bothShow = async (list, what, timeoutMs = 20000) => {
    for (const [name, s] of [["alice", alice], ["bob", bob]]) {
      try {
        await s.waitFor(
          (want) => {
            const got = [...document.querySelectorAll("#messages li.message .content")].map((n) => n.textContent);
            return JSON.stringify(got) === JSON.stringify(want) ? got : false;
          },
          [list],
          { what: `${name}'s screen to show exactly ${JSON.stringify(list)} (${what})`, timeoutMs },
        );
      } catch (err) {
        const got = await s.exec(messagesOnScreen).catch(() => "?");
        await shot(s, `failed-${name}`).catch(() => {});
        throw new Error(`${err.message}; on screen: ${JSON.stringify(got)}; status: ${await s.exec(statusText).catch(() => "?")}`);
      }
    }
  };

  await t.test("sign in with the links up.sh prints; the token leaves the address bar", async () => {
    for (const [user, s] of [["alice", alice], ["bob", bob]]) {
      await s.navigate(`${EDGE}/#token=${token(user)}`);
      await s.waitFor((u) => document.getElementById("me").textContent === u, [user], { what: `${user} signed in` });
      const url = await s.exec(() => location.href);
      assert.ok(!url.includes("token"), `the token is gone from the URL: ${url}`);
      await s.waitFor(() => document.getElementById("conn-status").textContent === "live", [], { what: "notifications live" });
    }
  });

  await t.test("start a conversation, exchange messages both ways, typing, read receipts", async () => {
    await alice.type("#new-peer", "bob");
    await alice.click("#start-chat");
    await alice.waitFor(() => !document.getElementById("conversation").hidden && document.getElementById("conn-status").textContent === "live", [], {
      what: "alice's conversation live",
    });
    await sendFrom(alice, "Hi Bob! Did the order go through?");
    await alice.waitFor((n) => document.querySelectorAll("#messages li.message").length === n, [1], { what: "alice sees her message" });

    // Bob sees the conversation in his list with an unread badge, and opens it.
    await bob.waitFor(() => document.querySelector('#conversation-list li[data-peer="alice"] .badge.unread')?.textContent === "1", [], {
      what: "bob's unread badge",
    });
    await openChatWith(bob, "alice");
    await bothShow(expected, "first message");

    // Typing: bob types, alice sees it; it ends when he sends.
    await bob.type("#composer", "Yes, it");
    await alice.waitFor(() => !document.getElementById("typing").hidden && document.getElementById("typing").textContent, [], {
      what: "alice sees bob typing",
    });
    assert.equal(await alice.text("#typing"), "bob is typing…");
    // (the composer already holds "Yes, it")
    await sendFrom(bob, "Yes, it did. Payment went through this morning.", " did. Payment went through this morning.");
    await bothShow(expected, "a reply");
    await alice.waitFor(() => document.getElementById("typing").hidden, [], { what: "typing indicator gone" });

    // Read receipt: bob has the conversation open, so alice's next message is read at once.
    await sendFrom(alice, "Great, thanks! 🎉");
    await bothShow(expected, "third message");
    await alice.waitFor(
      () => document.querySelector("#messages li.mine:last-child .seen")?.textContent === "Seen",
      [],
      { what: "alice sees 'Seen' under her last message" },
    );
    await alice.waitFor(() => document.getElementById("peer-dot").classList.contains("online"), [], { what: "bob shown online" });
    await shot(alice, "1-alice-chat");
    await shot(bob, "1-bob-chat");
  });

  await t.test("the chat socket service dies mid-conversation and comes back: each message once, in order", async () => {
    assert.ok(STACK_DIR, "STACK_DIR is set by tests/web/run.sh");
    const pidFile = path.join(STACK_DIR, "pids", "chatwebsocketshandler.pid");
    const pid = Number(readFileSync(pidFile, "utf8").trim());
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8");
    assert.ok(cmdline.includes("chatwebsocketshandler"), `pid ${pid} is the stack's socket service`);
    process.kill(pid, "SIGKILL");

    for (const [name, s] of [["alice", alice], ["bob", bob]]) {
      await s.waitFor(() => document.getElementById("conn-status").textContent === "reconnecting…", [], {
        what: `${name}'s page to show reconnecting…`,
      });
    }
    await shot(bob, "2-bob-reconnecting");
    // Messages keep being accepted (chatpersistence is up); the sockets are not.
    await sendFrom(alice, "Sent while the sockets were down (1)");
    await sendFrom(bob, "Me too, while down (2)");
    await sendFrom(alice, "And another one (3)");
    await alice.waitFor((n) => document.querySelectorAll("#messages li.message").length >= n, [expected.length - 1], {
      what: "alice's own messages shown",
    });

    // up.sh starts what is not running: the socket service only.
    await script("up.sh");
    for (const [name, s] of [["alice", alice], ["bob", bob]]) {
      await s.waitFor(() => document.getElementById("conn-status").textContent === "live", [], {
        what: `${name}'s page live again`,
        timeoutMs: 30000,
      });
    }
    await sendFrom(bob, "Back online (4)");
    await sendFrom(alice, "Welcome back (5)");
    // Generous: messages accepted while the sockets were down may sit in the change
    // handler's bounded retries (MESSAGE_RETRY_*) before the pipeline moves on.
    const restarted = Date.now();
    await bothShow(expected, "after the restart", 45000);
    t.diagnostic(`both screens complete ${Date.now() - restarted} ms after the last send`);
    // Once more after everything settled: the change handler's retried forwards and the
    // replay overlap, and nothing may show twice.
    await new Promise((r) => setTimeout(r, 3000));
    await bothShow(expected, "after the retries settled", 1000);
    for (const s of [alice, bob]) {
      const ids = await s.exec(() => [...document.querySelectorAll("#messages li.message")].map((li) => li.dataset.id));
      assert.equal(new Set(ids).size, ids.length, "one row per message id");
      assert.deepEqual([...ids].sort(), ids, "rows in id (creation) order");
    }
  });

  await t.test("history reloads the same conversation in the same order (a fresh page)", async () => {
    await bob.navigate(`${EDGE}/`);
    await bob.waitFor(() => document.getElementById("me").textContent === "bob", [], { what: "bob signed in after reload" });
    await openChatWith(bob, "alice");
    await bob.waitFor(
      (want) => JSON.stringify([...document.querySelectorAll("#messages li.message .content")].map((n) => n.textContent)) === JSON.stringify(want),
      [expected],
      { what: "bob's reloaded history" },
    );
  });

  await t.test("a purchase event appears in the bell", async () => {
    await script("create-event.sh", "purchase", "bob", "paid");
    await bob.waitFor(() => document.getElementById("bell-count").textContent === "1" && !document.getElementById("bell-count").hidden, [], {
      what: "bob's bell count",
      timeoutMs: 30000,
    });
    await bob.click("#bell");
    const title = await bob.waitFor(() => document.querySelector('#bell-list li.notification[data-kind="purchase"] .n-title')?.textContent, [], {
      what: "the purchase in the bell",
    });
    assert.equal(title, "Purchase paid");
    await shot(bob, "3-bob-bell");
    await bob.click("#bell");
  });

  await t.test("a deleted message disappears on the other screen", async () => {
    await sendFrom(alice, "oops, wrong window");
    await bothShow(expected, "the message to delete");
    await shot(bob, "4-bob-before-delete");
    await alice.click("#messages li.mine:last-child .delete-msg");
    expected.pop();
    await bothShow(expected, "after the deletion");
  });

  await t.test("phone width: one pane at a time, the conversation usable", async () => {
    await bob.setSize(390, 760);
    await bob.waitFor(() => {
      const side = document.getElementById("sidebar");
      return getComputedStyle(side).display === "none" && document.getElementById("composer").getBoundingClientRect().width > 200;
    }, [], { what: "phone layout: the conversation alone" });
    await shot(bob, "5-bob-phone");
    await bob.click("#back");
    await bob.waitFor(() => getComputedStyle(document.getElementById("sidebar")).display !== "none", [], { what: "back to the list" });
    await bob.setSize(1000, 720);
  });

  // The picture for the README: bob's window, conversation open, bell open.
  await openChatWith(bob, "alice");
  await bob.waitFor((n) => document.querySelectorAll("#messages li.message").length === n, [expected.length], { what: "final view" });
  await bob.click("#bell");
  await bob.waitFor(() => !document.getElementById("bell-panel").hidden, [], { what: "bell open" });
  await shot(bob, "web-chat");
  assert.deepEqual(await alice.exec(messagesOnScreen), expected);
  assert.equal(await alice.exec(statusText), "live");
});
