// The chatfleet web app: a plain static page on the SDK (sdk/chatfleet.js, the
// same file as clients/js/src). Why it exists: to show what chatfleet looks like
// to a user and to prove the SDK in a real browser (tests/web). It keeps no state
// of its own that the SDK already keeps: the conversation's messages (each once,
// in order) come from the SDK's Conversation; this file only draws them.
//
// Sign-in: the token comes in the URL fragment (#token=…, printed by
// deploy/local/up.sh) and is kept in this tab's sessionStorage, so two tabs can be
// two users. Everything user-supplied is drawn with textContent, never as HTML.
import { ChatfleetClient, compareIds, tokenClaims, REACTIONS } from "./sdk/chatfleet.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "chatfleet.token";
const STATE_TEXT = {
  idle: "",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  closed: "",
  removed: "removed from this conversation",
  expired: "session expired: open a new sign-in link",
};

// --- sign-in ---------------------------------------------------------------------------

function takeTokenFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    // Out of the address bar and the history: the fragment did its job.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

function showSignIn(message) {
  $("signin").hidden = false;
  $("app").hidden = true;
  $("signin-error").hidden = !message;
  $("signin-error").textContent = message ?? "";
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  location.reload();
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// --- helpers ----------------------------------------------------------------------------

let toastTimer = null;
function toast(text) {
  $("toast").textContent = text;
  $("toast").hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => ($("toast").hidden = true), 5000);
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function timeOf(value) {
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

function money(minor, currency) {
  if (typeof minor !== "number") return "";
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: currency || "EUR" }).format(minor / 100);
  } catch {
    return `${(minor / 100).toFixed(2)} ${currency ?? ""}`;
  }
}

// --- the app ----------------------------------------------------------------------------

const token = takeTokenFromFragment();
const me = token ? tokenClaims(token)?.sub : null;

if (!token || !me) {
  showSignIn(token ? "That token could not be read." : null);
} else if (ChatfleetClient.expired(token)) {
  sessionStorage.removeItem(TOKEN_KEY);
  showSignIn("Your sign-in link has expired: run deploy/local/up.sh (or token.sh) for a new one.");
} else {
  start();
}

function start() {
  const client = new ChatfleetClient({
    baseUrl: location.origin,
    getToken: () => sessionStorage.getItem(TOKEN_KEY),
    reconnect: { baseMs: 500, maxMs: 8000 },
  });
  $("app").hidden = false;
  $("me").textContent = me;
  $("bell").hidden = false;
  $("sign-out").hidden = false;

  let current = null; // { conv, view, key }
  const deletedIds = new Set(); // deletions seen in this tab
  let notifications = null;
  const states = { conversation: "idle", notifications: "idle" };

  function renderStatus() {
    // The worst of the two sockets is what the user needs to know.
    const order = ["expired", "removed", "reconnecting", "connecting", "live", "idle", "closed"];
    const worst = order.find((s) => Object.values(states).includes(s)) ?? "idle";
    $("conn-status").dataset.state = worst;
    $("conn-status").textContent = STATE_TEXT[worst] ?? worst;
  }

  // --- conversation list ---------------------------------------------------------------

  const refreshList = debounce(async () => {
    try {
      const { conversations } = await client.conversations({ limit: 50 });
      renderList(conversations);
    } catch (err) {
      toast(`Could not load conversations: ${err.message}`);
    }
  }, 150);

  function renderList(conversations) {
    const list = $("conversation-list");
    list.replaceChildren();
    $("no-conversations").hidden = conversations.length > 0;
    for (const c of conversations) {
      const li = el("li", "conversation-item");
      li.dataset.conversation = c.conversation_id;
      if (c.peer_id) li.dataset.peer = c.peer_id;
      if (current?.conv.conversationId === c.conversation_id) li.classList.add("active");
      const others = c.members.filter((m) => m !== me);
      const online = c.online.some((m) => m !== me);
      const dot = el("span", online ? "dot online" : "dot");
      dot.title = online ? "online" : "offline";
      const body = el("div", "conversation-body");
      body.append(el("div", "conversation-name", c.title ?? c.peer_id ?? others.join(", ")));
      const last = c.last_message;
      // A deleted last message comes with deleted_at and an empty excerpt; one
      // deleted while this page is open is known from its frame first.
      const deleted = last && (last.deleted_at != null || deletedIds.has(last.message_id));
      const excerpt = deleted ? "message deleted" : last?.excerpt;
      body.append(el("div", "conversation-last", last ? `${last.sender_id === me ? "You: " : ""}${excerpt}` : ""));
      li.append(dot, body);
      // The open conversation is read as it arrives: no badge for it.
      const unread = current?.conv.conversationId === c.conversation_id ? 0 : c.unread_count;
      if (unread > 0) li.append(el("span", "badge unread", String(unread)));
      li.addEventListener("click", () =>
        c.kind === "group" ? openConversation({ conversationId: c.conversation_id, title: c.title }) : openConversation({ peerId: c.peer_id }),
      );
      list.append(li);
    }
  }

  $("new-conversation").addEventListener("submit", (e) => {
    e.preventDefault();
    const peer = $("new-peer").value.trim();
    if (!/^[A-Za-z0-9_.:@-]{1,128}$/.test(peer)) return toast("A user id is 1–128 of A–Z a–z 0–9 _ . : @ -");
    if (peer === me) return toast("Pick someone else.");
    $("new-peer").value = "";
    openConversation({ peerId: peer });
  });

  // --- one conversation ------------------------------------------------------------------

  function openConversation({ peerId, conversationId, title }) {
    const key = peerId ? `peer:${peerId}` : `conv:${conversationId}`;
    if (current?.key === key) return showConversation(true);
    current?.conv.close();
    const conv = client.openConversation(peerId ? { peerId } : { conversationId });
    const view = { peerReadUpTo: null, editing: null, typing: new Set() };
    current = { conv, view, key };
    $("messages").replaceChildren();
    $("peer-name").textContent = title ?? peerId ?? conversationId;
    $("typing").hidden = true;
    cancelEdit();
    showConversation(true);

    conv.on("state", ({ state }) => {
      if (current?.conv !== conv) return;
      states.conversation = state;
      renderStatus();
      renderPresence();
      if (state === "removed") {
        toast("You are no longer a member of this conversation.");
        refreshList();
      }
    });
    conv.on("message", ({ message }) => {
      if (current?.conv !== conv) return;
      drawMessage(message);
      if (message.sender_id !== me) readSoon();
      refreshList();
    });
    conv.on("update", ({ message }) => current?.conv === conv && drawMessage(message));
    conv.on("delete", ({ message }) => {
      if (current?.conv !== conv) return;
      document.querySelector(`#messages li[data-id="${CSS.escape(message.message_id)}"]`)?.remove();
      deletedIds.add(message.message_id);
      renderSeen();
      refreshList();
    });
    conv.on("typing", ({ userId, typing }) => {
      if (current?.conv !== conv) return;
      if (typing) view.typing.add(userId);
      else view.typing.delete(userId);
      const who = [...view.typing];
      $("typing").hidden = who.length === 0;
      $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
    });
    conv.on("presence", () => current?.conv === conv && renderPresence());
    conv.on("read", ({ upTo }) => {
      if (current?.conv !== conv) return;
      if (!view.peerReadUpTo || compareIds(upTo, view.peerReadUpTo) > 0) view.peerReadUpTo = upTo;
      renderSeen();
    });
    conv.on("member", () => refreshList());
    conv.on("error", ({ error }) => console.warn("chatfleet:", error));

    conv
      .start()
      .then(() => {
        if (current?.conv !== conv) return;
        $("load-older").hidden = !conv.hasOlder;
        renderPresence();
        scrollToEnd();
        readSoon();
        refreshList();
      })
      .catch((err) => toast(`Could not open the conversation: ${err.message}`));
  }

  function showConversation(on) {
    $("conversation").hidden = !on;
    $("placeholder").hidden = on;
    document.body.classList.toggle("in-conversation", on);
    if (on) $("composer").focus();
  }

  $("back").addEventListener("click", () => {
    showConversation(false);
    current?.conv.close();
    current = null;
    states.conversation = "idle";
    renderStatus();
    refreshList();
  });

  function renderPresence() {
    const conv = current?.conv;
    // While the socket is down nobody's presence is known.
    const online = conv?.state === "live" ? [...conv.online].some((u) => u !== me) : false;
    $("peer-dot").className = online ? "dot online" : "dot";
    $("peer-dot").title = online ? "online" : "offline";
  }

  const readSoon = debounce(() => {
    const conv = current?.conv;
    if (!conv || document.hidden) return;
    conv.markRead().catch((err) => console.warn("chatfleet: read marker", err));
  }, 300);
  document.addEventListener("visibilitychange", () => !document.hidden && readSoon());

  function scrollToEnd() {
    const wrap = $("messages-wrap");
    wrap.scrollTop = wrap.scrollHeight;
  }

  /** Draw (or redraw) one message in id order: each message_id has exactly one row. */
  function drawMessage(m) {
    const list = $("messages");
    const existing = list.querySelector(`li[data-id="${CSS.escape(m.message_id)}"]`);
    if (m.deleted_at) return existing?.remove();
    const mine = m.sender_id === me;
    const li = el("li", mine ? "message mine" : "message theirs");
    li.dataset.id = m.message_id;
    li.dataset.sender = m.sender_id;
    if (!mine && (current?.conv.isGroup ?? false)) li.append(el("div", "sender", m.sender_id));
    li.append(el("div", "content", m.content));
    const meta = el("div", "meta");
    meta.append(el("span", "time", timeOf(m.created_at)));
    if (m.edited_at) meta.append(el("span", "edited", "edited"));
    const reactions = Object.entries(m.reactions ?? {}).filter(([, n]) => n > 0);
    if (reactions.length) meta.append(el("span", "reactions", reactions.map(([e, n]) => (n > 1 ? `${e}${n}` : e)).join(" ")));
    if (mine) {
      const edit = el("button", "link edit-msg", "edit");
      edit.type = "button";
      edit.addEventListener("click", () => startEdit(m.message_id));
      const del = el("button", "link delete-msg", "delete");
      del.type = "button";
      del.addEventListener("click", () =>
        current?.conv.delete(m.message_id).catch((err) => toast(`Could not delete: ${err.message}`)),
      );
      meta.append(edit, del);
    } else {
      const like = el("button", "link react-msg", REACTIONS[0]);
      like.type = "button";
      like.title = "react";
      like.addEventListener("click", () => current?.conv.react(m.message_id, REACTIONS[0]).catch((err) => toast(err.message)));
      meta.append(like);
    }
    li.append(meta);
    if (existing) {
      existing.replaceWith(li);
    } else {
      // Insert by id (ids sort by creation); nearly always at the end.
      const atEnd = $("messages-wrap").scrollHeight - $("messages-wrap").scrollTop - $("messages-wrap").clientHeight < 80;
      let after = list.lastElementChild;
      while (after && compareIds(after.dataset.id, m.message_id) > 0) after = after.previousElementSibling;
      if (after) after.after(li);
      else list.prepend(li);
      if (atEnd || mine) scrollToEnd();
    }
    renderSeen();
  }

  /** "Seen" under my newest message the other side has read. */
  function renderSeen() {
    const upTo = current?.view.peerReadUpTo;
    for (const old of document.querySelectorAll("#messages .seen")) old.remove();
    if (!upTo) return;
    const mine = [...document.querySelectorAll("#messages li.mine")].filter((li) => compareIds(li.dataset.id, upTo) <= 0);
    mine.at(-1)?.querySelector(".meta")?.append(el("span", "seen", "Seen"));
  }

  $("load-older").addEventListener("click", async () => {
    const conv = current?.conv;
    if (!conv) return;
    const wrap = $("messages-wrap");
    const before = wrap.scrollHeight;
    try {
      await conv.loadOlder();
      wrap.scrollTop += wrap.scrollHeight - before;
    } catch (err) {
      toast(`Could not load older messages: ${err.message}`);
    }
    $("load-older").hidden = !conv.hasOlder;
  });

  // --- composer ------------------------------------------------------------------------

  $("composer").addEventListener("input", () => {
    if ($("composer").value && !current?.view.editing) current?.conv.typing();
  });

  function startEdit(messageId) {
    const m = current?.conv.byId.get(messageId);
    if (!m) return;
    current.view.editing = messageId;
    $("composer").value = m.content;
    $("editing").hidden = false;
    $("send").textContent = "Save";
    $("composer").focus();
  }

  function cancelEdit() {
    if (current) current.view.editing = null;
    $("editing").hidden = true;
    $("send").textContent = "Send";
    $("composer").value = "";
  }
  $("cancel-edit").addEventListener("click", cancelEdit);

  $("composer-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const conv = current?.conv;
    const text = $("composer").value.trim();
    if (!conv || !text) return;
    const editing = current.view.editing;
    $("composer").value = "";
    try {
      if (editing) {
        cancelEdit();
        await conv.edit(editing, text);
      } else {
        await conv.send(text);
      }
    } catch (err) {
      // Nothing was stored (or the retries ran out): give the text back.
      if (!$("composer").value) $("composer").value = text;
      toast(`Not sent: ${err.message}`);
    }
  });

  // --- notifications: the bell, badges, the list -------------------------------------------

  const bellItems = [];
  function describe(n) {
    const d = n.data ?? {};
    const status = String(d.status ?? "").replace(/_/g, " ");
    switch (n.kind) {
      case "purchase":
        return { title: `Purchase ${status}`, detail: [money(d.amount_minor ?? d.amount, d.currency), d.purchase_id].filter(Boolean).join(" · ") };
      case "payment_reminder":
        return { title: `Payment ${status}`, detail: [money(d.amount_minor ?? d.amount, d.currency), d.due_date ? `due ${new Date(d.due_date).toLocaleDateString()}` : ""].filter(Boolean).join(" · ") };
      case "shipping":
        return { title: `Shipment ${status}`, detail: [d.carrier, d.tracking_number].filter(Boolean).join(" · ") };
      default:
        return { title: n.kind, detail: "" };
    }
  }

  function renderBell() {
    const unseen = bellItems.filter((i) => !i.seen).length;
    $("bell-count").hidden = unseen === 0;
    $("bell-count").textContent = String(unseen);
    $("bell-empty").hidden = bellItems.length > 0;
    const list = $("bell-list");
    list.replaceChildren();
    for (const item of [...bellItems].reverse()) {
      const li = el("li", `notification kind-${item.n.kind}`);
      li.dataset.kind = item.n.kind;
      const { title, detail } = describe(item.n);
      li.append(el("div", "n-title", title), el("div", "n-detail muted", detail));
      list.append(li);
    }
  }

  $("bell").addEventListener("click", () => {
    const open = $("bell-panel").hidden;
    $("bell-panel").hidden = !open;
    $("bell").setAttribute("aria-expanded", String(open));
    if (open) {
      for (const i of bellItems) i.seen = true;
      renderBell();
    }
  });

  notifications = client.openNotifications();
  notifications.on("state", ({ state }) => {
    states.notifications = state;
    renderStatus();
    if (state === "live") refreshList(); // badges may have moved while it was down
  });
  notifications.on("notification", ({ notification: n }) => {
    if (n.kind === "chat") return refreshList();
    bellItems.push({ n, seen: !$("bell-panel").hidden });
    if (bellItems.length > 100) bellItems.shift();
    renderBell();
  });
  notifications.on("conversation", () => refreshList());
  notifications.start().catch((err) => toast(`Notifications unavailable: ${err.message}`));

  window.addEventListener("online", () => {
    notifications?.reconnectNow();
    current?.conv.reconnectNow();
  });

  renderBell();
  refreshList();
  renderStatus();
}
