// chatfleet.js: the browser (and Node 20+) client for chatfleet.
//
// Why this module exists: the hard parts of a chat client are the same for every
// frontend and easy to get subtly wrong: retrying a send without sending twice
// (client_message_id), honouring Retry-After, reconnecting with `since` so that no
// message is lost, the resync (4000), token-expiry (4003) and removal (4004) close
// codes, deduplicating by message id when the replay and the history overlap,
// delivering messages in order, heartbeats that notice a dead network, and
// backoff that does not hammer a recovering fleet. This file does all of that once,
// with no dependencies (fetch, WebSocket and WebCrypto only), following
// docs/api.md and docs/socket-protocol.md. Types: chatfleet.d.ts.

/** Close codes of docs/socket-protocol.md. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  RESYNC: 4000,
  SLOW_CONSUMER: 4001,
  HEARTBEAT_TIMEOUT: 4002,
  TOKEN_EXPIRED: 4003,
  REMOVED: 4004,
});

/** The emoji the server accepts as reactions. */
export const REACTIONS = Object.freeze(["👍", "👎", "❤️", "😂", "😮", "😢", "🙏", "🎉", "🔥", "👀", "✅"]);

// The largest UUIDv7: `before` it is "the newest page".
const NEWEST = "ffffffff-ffff-7fff-bfff-ffffffffffff";
const USER_ID = /^[A-Za-z0-9_.:@-]{1,128}$/;
// Bounds: every loop and memory here has one.
const MAX_CATCH_UP_PAGES = 50;
const RECENT_NOTIFICATION_IDS = 1000;
const EVENT_BUFFER = 1000;

/** An API error: `{"error":{"code","message"}}` with its HTTP status (0: network). */
export class ChatfleetError extends Error {
  constructor(status, code, message, retryAfterMs = null) {
    super(message || code);
    this.name = "ChatfleetError";
    this.status = status;
    this.code = code;
    this.retryAfterMs = retryAfterMs;
  }
}

/** Exponential backoff with jitter: a delay in [cap/2, cap], cap = min(maxMs, baseMs·2^attempt). */
export function backoffDelay(attempt, { baseMs = 500, maxMs = 30000, random = Math.random } = {}) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(attempt, 0), 30));
  return Math.round(cap / 2 + random() * (cap / 2));
}

/** `Retry-After` (seconds or an HTTP date) in milliseconds, or null. */
export function parseRetryAfter(value, now = Date.now()) {
  if (value == null || value === "") return null;
  const text = String(value).trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Math.round(Number(text) * 1000);
  const at = Date.parse(text);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

/** Message ids are UUIDv7 in lowercase hex: their text order is their creation order. */
export function compareIds(a, b) {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** The claims of a JWT (not verified: the server does that), or null. */
export function tokenClaims(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/** The conversation id of a pair (docs/api.md, "The conversation id"). */
export async function streamIdFor(a, b) {
  const [x, y] = [a, b].sort((p, q) => compareBytes(p, q));
  const enc = new TextEncoder();
  const parts = [x, y].flatMap((id) => {
    const bytes = enc.encode(id);
    const len = new Uint8Array(4);
    new DataView(len.buffer).setUint32(0, bytes.length);
    return [len, bytes];
  });
  const input = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((at, p) => (input.set(p, at), at + p.length), 0);
  const digest = await crypto.subtle.digest("SHA-256", input);
  return [...new Uint8Array(digest)].map((v) => v.toString(16).padStart(2, "0")).join("").slice(0, 32);
}

function compareBytes(a, b) {
  const x = new TextEncoder().encode(a);
  const y = new TextEncoder().encode(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

/** A fresh client message id (retries of one send reuse it). */
export function newClientMessageId() {
  return `c-${crypto.randomUUID()}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A tiny event emitter: `on(type, fn)` returns the function that unsubscribes. */
class Emitter {
  #handlers = new Map();
  #queues = new Set();

  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    this.#handlers.get(type)?.delete(fn);
  }

  emit(type, detail) {
    for (const fn of [...(this.#handlers.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        // An app's handler must not break the socket loop.
        queueMicrotask(() => {
          throw err;
        });
      }
    }
    for (const queue of this.#queues) queue.push({ type, ...(detail && typeof detail === "object" ? detail : { value: detail }) });
  }

  /**
   * Every event as `{type, ...detail}`, in order, as an async iterator. The buffer
   * is bounded (1000 events): an iterator that falls that far behind ends with an
   * error instead of growing without limit.
   */
  events() {
    const items = [];
    let wake = null;
    let failed = null;
    const queue = {
      push: (item) => {
        if (items.length >= EVENT_BUFFER) {
          failed = new ChatfleetError(0, "event_buffer_full", "the event iterator fell 1000 events behind");
        } else items.push(item);
        wake?.();
      },
    };
    this.#queues.add(queue);
    const queues = this.#queues;
    return {
      [Symbol.asyncIterator]() {
        return this;
      },
      async next() {
        while (!items.length && !failed) await new Promise((resolve) => (wake = resolve));
        wake = null;
        if (items.length) return { value: items.shift(), done: false };
        queues.delete(queue);
        throw failed;
      },
      async return() {
        queues.delete(queue);
        return { value: undefined, done: true };
      },
    };
  }
}

/**
 * The client: one per signed-in user.
 *
 *   const client = new ChatfleetClient({ baseUrl: location.origin, getToken: async () => token });
 */
export class ChatfleetClient extends Emitter {
  /**
   * @param {object} options
   * @param {string} [options.baseUrl]  the edge's origin ("" = the page's origin)
   * @param {(o: {forceRefresh: boolean}) => Promise<string>|string} options.getToken
   * @param {string} [options.userId]   defaults to the token's `sub`
   */
  constructor(options = {}) {
    super();
    if (typeof options.getToken !== "function") throw new TypeError("getToken is required");
    const origin = globalThis.location?.origin ?? "";
    this.baseUrl = String(options.baseUrl ?? origin).replace(/\/+$/, "");
    this.getToken = options.getToken;
    this.userId = options.userId ?? null;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.retry = { attempts: 5, baseMs: 300, maxMs: 10000, timeoutMs: 15000, ...options.retry };
    this.reconnect = { baseMs: 500, maxMs: 30000, ...options.reconnect };
    this.heartbeatMs = options.heartbeatMs ?? 25000;
    this.random = options.random ?? Math.random;
  }

  /** The current token (and the user id, from its `sub`, on first use). */
  async token(forceRefresh = false) {
    const token = await this.getToken({ forceRefresh });
    if (!token) throw new ChatfleetError(401, "no_token", "no token");
    if (!this.userId) this.userId = tokenClaims(token)?.sub ?? null;
    return token;
  }

  /** Whether a token's `exp` has passed. */
  static expired(token, now = Date.now()) {
    const exp = tokenClaims(token)?.exp;
    return typeof exp === "number" && exp * 1000 <= now;
  }

  /**
   * One API call. `retry`: "idempotent" (network errors, 502/503/504 and 429 are
   * retried), "unsafe" (only 429, where nothing was done). Bounded by
   * `retry.attempts`; a `Retry-After` longer than `retry.maxMs` is not waited for.
   */
  async request(method, path, { query, body, retry = "idempotent" } = {}) {
    const url = new URL(this.baseUrl + path, this.baseUrl || undefined);
    for (const [k, v] of Object.entries(query ?? {})) if (v != null && v !== "") url.searchParams.set(k, String(v));
    let refreshed = false;
    for (let attempt = 0; ; attempt++) {
      const last = attempt + 1 >= this.retry.attempts;
      const token = await this.token(refreshed);
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), this.retry.timeoutMs);
      let res;
      try {
        res = await this.fetch(url.toString(), {
          method,
          headers: {
            Authorization: `Bearer ${token}`,
            ...(body !== undefined ? { "Content-Type": "application/json" } : {}),
          },
          body: body !== undefined ? JSON.stringify(body) : undefined,
          signal: abort.signal,
        });
      } catch (err) {
        clearTimeout(timer);
        if (retry !== "idempotent" || last) {
          throw new ChatfleetError(0, "network", `${method} ${path}: ${err?.message ?? err}`);
        }
        await sleep(backoffDelay(attempt, { ...this.retry, random: this.random }));
        continue;
      }
      let data = null;
      try {
        const text = await res.text();
        data = text ? JSON.parse(text) : null;
      } catch {
        data = null;
      } finally {
        clearTimeout(timer);
      }
      if (res.ok) return data;
      const code = data?.error?.code ?? `http_${res.status}`;
      const message = data?.error?.message ?? `${method} ${path}: HTTP ${res.status}`;
      const retryAfter = parseRetryAfter(res.headers.get("retry-after"));
      if (res.status === 401 && !refreshed) {
        refreshed = true; // one fresh token, then give up
        continue;
      }
      const retryable = res.status === 429 || (retry === "idempotent" && [502, 503, 504].includes(res.status));
      const wait = retryAfter ?? backoffDelay(attempt, { ...this.retry, random: this.random });
      if (!retryable || last || wait > this.retry.maxMs) throw new ChatfleetError(res.status, code, message, retryAfter);
      await sleep(wait);
    }
  }

  // --- messages -------------------------------------------------------------------

  /**
   * Send a message to `to` (a user) or `conversationId` (a group). Retried on
   * network errors, 429 and 503 with the same client_message_id, so it is stored once.
   */
  async sendMessage({ to, conversationId, content, clientMessageId = newClientMessageId() }) {
    await this.token();
    const body = { sender_id: this.userId, content, client_message_id: clientMessageId };
    if (conversationId && conversationId.startsWith("g")) body.conversation_id = conversationId;
    else if (to) body.receiver_id = to;
    else throw new TypeError("sendMessage needs `to` or a group's `conversationId`");
    return this.request("POST", "/chat/messages", { body });
  }

  /** One page of history, oldest first: `{messages, has_more}`. `before: "newest"` = the latest page. */
  history({ peerId, conversationId, since, before, limit } = {}) {
    const query = { limit, since, before: before === "newest" ? NEWEST : before };
    if (peerId) query.peer_id = peerId;
    else if (conversationId) query.conversation_id = conversationId;
    return this.request("GET", "/chat/messages", { query });
  }

  editMessage(messageId, content) {
    return this.request("PATCH", `/chat/messages/${encodeURIComponent(messageId)}`, { body: { content } });
  }

  deleteMessage(messageId) {
    return this.request("DELETE", `/chat/messages/${encodeURIComponent(messageId)}`);
  }

  react(messageId, emoji) {
    return this.request("PUT", `/chat/messages/${encodeURIComponent(messageId)}/reactions/${encodeURIComponent(emoji)}`);
  }

  unreact(messageId, emoji) {
    return this.request("DELETE", `/chat/messages/${encodeURIComponent(messageId)}/reactions/${encodeURIComponent(emoji)}`);
  }

  // --- conversations ---------------------------------------------------------------

  /** The caller's conversations, most recent first: `{conversations, next}`. */
  conversations({ limit, before } = {}) {
    return this.request("GET", "/chat/conversations", { query: { limit, before } });
  }

  conversation(conversationId) {
    return this.request("GET", `/chat/conversations/${encodeURIComponent(conversationId)}`);
  }

  createGroup({ title, members = [] }) {
    return this.request("POST", "/chat/conversations", { body: { title, members }, retry: "unsafe" });
  }

  renameGroup(conversationId, title) {
    return this.request("PATCH", `/chat/conversations/${encodeURIComponent(conversationId)}`, { body: { title } });
  }

  addMember(conversationId, userId) {
    return this.request("POST", `/chat/conversations/${encodeURIComponent(conversationId)}/members`, {
      body: { user_id: userId },
      retry: "unsafe",
    });
  }

  removeMember(conversationId, userId) {
    return this.request(
      "DELETE",
      `/chat/conversations/${encodeURIComponent(conversationId)}/members/${encodeURIComponent(userId)}`,
    );
  }

  /** Move the caller's read marker (it only moves forward). */
  markRead(conversationId, upTo) {
    return this.request("POST", `/chat/conversations/${encodeURIComponent(conversationId)}/read`, {
      body: { up_to: upTo },
    });
  }

  /** Whether a user has a notification socket open anywhere. */
  presence(userId) {
    return this.request("GET", "/presence", { query: { user_id: userId } });
  }

  // --- sockets ------------------------------------------------------------------------

  /**
   * A live conversation: its messages (history, then the socket), in order, once
   * each, across reconnects. `peerId` for a pair, `conversationId` for a group (or a
   * pair's id together with `peerId`). Call `start()`.
   */
  openConversation(options) {
    return new Conversation(this, options);
  }

  /** The user's notification socket (purchases, payments, shipping, chat badges). Call `start()`. */
  openNotifications() {
    return new Notifications(this);
  }

  wsUrl(path, query) {
    const base = this.baseUrl || globalThis.location?.origin || "";
    const url = new URL(path, base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    for (const [k, v] of Object.entries(query)) if (v != null && v !== "") url.searchParams.set(k, String(v));
    return url.toString();
  }
}

/**
 * A reconnecting socket: heartbeats, backoff, the close codes. Subclasses say which
 * URL to open, what a frame means, and how to catch up after a break.
 * States: "connecting", "live", "reconnecting", "closed", "removed", "expired".
 */
class LiveSocket extends Emitter {
  constructor(client) {
    super();
    this.client = client;
    this.state = "idle";
    this.ws = null;
    this.attempt = 0;
    this.stopped = false;
    this.timer = null;
    this.heartbeat = null;
    this.lastFrameAt = 0;
    this.expiredInARow = 0;
  }

  setState(state, detail = {}) {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", { state, ...detail });
  }

  /** Close for good (code 1000). */
  close() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.heartbeat);
    if (this.ws) {
      try {
        this.ws.close(CloseCode.NORMAL);
      } catch {
        /* already closed */
      }
    }
    this.ws = null;
    this.setState("closed");
  }

  sendFrame(frame) {
    if (this.ws && this.ws.readyState === 1) {
      this.ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  async connect(forceRefresh = false) {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.setState(this.attempt === 0 && this.state !== "reconnecting" ? "connecting" : "reconnecting");
    let token;
    try {
      token = await this.client.token(forceRefresh);
    } catch (err) {
      this.emit("error", { error: err });
      return this.scheduleReconnect();
    }
    if (ChatfleetClient.expired(token)) {
      // The app has no fresher token: reconnecting would only be refused.
      this.stopped = true;
      this.setState("expired");
      return;
    }
    if (this.stopped) return;
    const url = this.client.wsUrl(this.path(), { ...(await this.query()), access_token: token });
    let ws;
    try {
      ws = new this.client.WebSocket(url);
    } catch (err) {
      this.emit("error", { error: err });
      return this.scheduleReconnect();
    }
    this.ws = ws;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      this.startHeartbeat(ws);
      this.setState("live");
      this.opened();
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      // A healthy socket resets the backoff only once frames flow.
      this.attempt = 0;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame.type === "string") this.frame(frame);
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.closed(event.code, event.reason);
    };
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  startHeartbeat(ws) {
    clearInterval(this.heartbeat);
    const every = this.client.heartbeatMs;
    this.heartbeat = setInterval(() => {
      if (this.ws !== ws) return clearInterval(this.heartbeat);
      // Nothing (not even our ping's pong) for two periods: the network is gone.
      if (Date.now() - this.lastFrameAt > every * 2) {
        try {
          ws.close();
        } catch {
          /* ignore */
        }
        return this.closed(CloseCode.HEARTBEAT_TIMEOUT, "no frame from the server");
      }
      this.sendFrame({ type: "ping" });
    }, every);
  }

  closed(code, reason) {
    clearInterval(this.heartbeat);
    this.ws = null;
    if (this.stopped) return;
    this.emit("close", { code, reason });
    if (code === CloseCode.REMOVED) {
      this.stopped = true;
      this.setState("removed");
      this.emit("removed", { code });
      return;
    }
    if (code === CloseCode.TOKEN_EXPIRED) {
      // A fresh token and at once, with `since`; backoff only if it keeps happening.
      this.expiredInARow++;
      if (this.expiredInARow <= 2) {
        this.setState("reconnecting", { code });
        return this.connect(true);
      }
    } else this.expiredInARow = 0;
    this.setState("reconnecting", { code });
    this.catchUp()
      .catch((err) => this.emit("error", { error: err }))
      .finally(() => this.scheduleReconnect());
  }

  scheduleReconnect() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    const delay = backoffDelay(this.attempt++, { ...this.client.reconnect, random: this.client.random });
    this.emit("retry", { delayMs: delay, attempt: this.attempt });
    this.timer = setTimeout(() => this.connect(false), delay);
  }

  /** Reconnect now (e.g. the browser came back online), skipping the backoff wait. */
  reconnectNow() {
    if (this.stopped || this.ws) return;
    this.attempt = 0;
    this.connect(false);
  }

  // Hooks for subclasses.
  opened() {}
  frame() {}
  async catchUp() {}
}

/**
 * A conversation's messages and events. Events (`on(type, fn)` or `events()`):
 * - `message` {message}: a message not shown before, in order (its id is larger
 *   than every id delivered before it, except your own sends, delivered at once)
 * - `update` {message}: an edit or a reaction change; replace it by id
 * - `delete` {message}: a deletion; remove it by id
 * - `typing` {userId, typing}; `presence` {userId, online}; `read` {userId, upTo}
 * - `member` {frame}: member_joined / member_left / conversation_updated
 * - `state` {state}: connecting, live, reconnecting, closed, removed, expired
 */
export class Conversation extends LiveSocket {
  constructor(client, { peerId, conversationId, presence = true, historyLimit = 50 } = {}) {
    super(client);
    if (!peerId && !conversationId) throw new TypeError("openConversation needs peerId or conversationId");
    if (peerId && !USER_ID.test(peerId)) throw new TypeError(`invalid peerId: ${peerId}`);
    this.peerId = peerId ?? null;
    this.conversationId = conversationId ?? null;
    this.isGroup = !peerId;
    this.presence = presence;
    this.historyLimit = historyLimit;
    /** message_id → message, everything shown. */
    this.byId = new Map();
    /** The newest id received from the conversation itself (socket or history): the `since` cursor. */
    this.cursor = null;
    /** Whether older history exists before the oldest message shown. */
    this.hasOlder = false;
    this.online = new Set();
    this.typingUsers = new Set();
    this.lastTypingSent = 0;
    this.typingPending = false;
    this.typingStopTimer = null;
    this.readUpTo = null;
  }

  /** The messages shown, oldest first (deleted ones excluded). */
  get messages() {
    return [...this.byId.values()].filter((m) => !m.deleted_at).sort((a, b) => compareIds(a.message_id, b.message_id));
  }

  /** Load the newest page of history, then open the socket with `since`. */
  async start() {
    await this.client.token();
    if (!this.conversationId) this.conversationId = await streamIdFor(this.client.userId, this.peerId);
    try {
      const page = await this.client.history({ ...this.who(), before: "newest", limit: this.historyLimit });
      this.hasOlder = !!page?.has_more;
      for (const m of page?.messages ?? []) this.ingest(m, "history");
    } catch (err) {
      // The socket's replay and the catch-up after it fill in what this missed.
      this.emit("error", { error: err });
    }
    await this.connect(false);
    return this;
  }

  who() {
    return this.isGroup ? { conversationId: this.conversationId } : { peerId: this.peerId };
  }

  /** Older messages before the oldest shown (one page); resolves to how many were added. */
  async loadOlder() {
    const oldest = this.messages[0]?.message_id ?? [...this.byId.keys()].sort(compareIds)[0];
    if (!oldest) return 0;
    const page = await this.client.history({ ...this.who(), before: oldest, limit: this.historyLimit });
    this.hasOlder = !!page?.has_more;
    let added = 0;
    for (const m of page?.messages ?? []) if (this.ingest(m, "older")) added++;
    return added;
  }

  path() {
    return "/chat/subscribe";
  }

  async query() {
    const q = this.isGroup
      ? { conversation_id: this.conversationId }
      : { stream_id: this.conversationId, sender_id: this.client.userId, receiver_id: this.peerId };
    if (this.cursor) q.since = this.cursor;
    if (this.presence) q.presence = "true";
    return q;
  }

  opened() {
    // Presence is announced again by the new socket.
    this.online.clear();
    if (this.typingPending && this.sendFrame({ type: "typing", state: "start" })) {
      this.typingPending = false;
      this.lastTypingSent = Date.now();
    }
    if (this.typingUsers.size) {
      for (const userId of this.typingUsers) this.emit("typing", { userId, typing: false });
      this.typingUsers.clear();
    }
  }

  /** History after the cursor, page by page (bounded), while the socket is down. */
  async catchUp() {
    for (let i = 0; i < MAX_CATCH_UP_PAGES && !this.stopped; i++) {
      const page = await this.client.history({ ...this.who(), since: this.cursor ?? undefined, limit: 200 });
      for (const m of page?.messages ?? []) this.ingest(m, "history");
      if (!page?.has_more || !page.messages?.length) return;
    }
  }

  /**
   * Add or refresh a message; returns true when it was new. Deduplicates by id;
   * `source` "socket" and "history" advance the `since` cursor, "sent" (your own
   * POST's answer) and "older" do not (the cursor must not skip what the
   * conversation has not delivered yet).
   */
  ingest(message, source) {
    if (!message?.message_id) return false;
    const id = message.message_id;
    if ((source === "socket" || source === "history") && (!this.cursor || compareIds(id, this.cursor) > 0)) {
      this.cursor = id;
    }
    const known = this.byId.get(id);
    if (known) {
      if (message.deleted_at && !known.deleted_at) {
        this.byId.set(id, message);
        this.emit("delete", { message });
      } else if ((message.version ?? 0) > (known.version ?? 0) && !known.deleted_at) {
        this.byId.set(id, message);
        this.emit("update", { message });
      }
      return false;
    }
    this.byId.set(id, message);
    if (message.deleted_at) return false;
    this.emit("message", { message, source });
    return true;
  }

  frame(f) {
    switch (f.type) {
      case "message":
        this.ingest(f.message, "socket");
        break;
      case "message_updated":
      case "message_deleted": {
        const m = f.message;
        if (!m?.message_id) break;
        const known = this.byId.get(m.message_id);
        if (f.type === "message_deleted" || m.deleted_at) {
          const gone = { ...(known ?? m), ...m, deleted_at: m.deleted_at ?? new Date().toISOString(), content: "" };
          this.byId.set(m.message_id, gone);
          if (!known?.deleted_at) this.emit("delete", { message: gone });
        } else if (known && !known.deleted_at && (m.version ?? 0) >= (known.version ?? 0)) {
          // (A deletion always wins; a change to a message never shown, e.g. older
          // than the loaded page, is picked up by history when that page is loaded.)
          this.byId.set(m.message_id, m);
          this.emit("update", { message: m });
        }
        break;
      }
      case "reaction_added":
      case "reaction_removed": {
        const m = this.byId.get(f.message_id);
        if (!m || m.deleted_at) break;
        const reactions = { ...(m.reactions ?? {}) };
        const n = (reactions[f.emoji] ?? 0) + (f.type === "reaction_added" ? 1 : -1);
        if (n > 0) reactions[f.emoji] = n;
        else delete reactions[f.emoji];
        const updated = { ...m, reactions };
        this.byId.set(m.message_id, updated);
        this.emit("update", { message: updated, reaction: { userId: f.user_id, emoji: f.emoji, added: f.type === "reaction_added" } });
        break;
      }
      case "typing": {
        const typing = f.state === "start";
        if (typing) this.typingUsers.add(f.user_id);
        else this.typingUsers.delete(f.user_id);
        this.emit("typing", { userId: f.user_id, typing });
        break;
      }
      case "presence":
        if (f.online) this.online.add(f.user_id);
        else this.online.delete(f.user_id);
        this.emit("presence", { userId: f.user_id, online: !!f.online });
        break;
      case "read":
        if (f.user_id !== this.client.userId) this.emit("read", { userId: f.user_id, upTo: f.up_to });
        break;
      case "member_joined":
      case "member_left":
      case "conversation_updated":
        this.emit("member", { frame: f });
        break;
      case "resync":
        this.emit("resync", { reason: f.reason });
        break;
      case "token_expired":
      case "pong":
      case "error":
      default:
        break;
    }
  }

  /**
   * Send a message in this conversation. The stored message is shown at once (the
   * socket's copy is deduplicated by id). Retries keep one client_message_id.
   */
  async send(content, { clientMessageId = newClientMessageId() } = {}) {
    this.stopTyping();
    const message = await this.client.sendMessage(
      this.isGroup ? { conversationId: this.conversationId, content, clientMessageId } : { to: this.peerId, content, clientMessageId },
    );
    this.ingest(message, "sent");
    return message;
  }

  /** Call on every keystroke: sends `start` at most every 2.5 s and `stop` after 3 s of quiet. */
  typing() {
    const now = Date.now();
    if (now - this.lastTypingSent > 2500) {
      // Not live: sent when the socket opens, if the user is still typing then.
      if (this.sendFrame({ type: "typing", state: "start" })) this.lastTypingSent = now;
      else this.typingPending = true;
    }
    clearTimeout(this.typingStopTimer);
    this.typingStopTimer = setTimeout(() => this.stopTyping(), 3000);
  }

  stopTyping() {
    clearTimeout(this.typingStopTimer);
    this.typingPending = false;
    if (this.lastTypingSent) {
      this.lastTypingSent = 0;
      this.sendFrame({ type: "typing", state: "stop" });
    }
  }

  /** Mark everything up to `upTo` (default: the newest message shown) as read; never moves back. */
  async markRead(upTo = this.messages.at(-1)?.message_id) {
    if (!upTo || (this.readUpTo && compareIds(upTo, this.readUpTo) <= 0)) return null;
    this.readUpTo = upTo;
    return this.client.markRead(this.conversationId, upTo);
  }

  edit(messageId, content) {
    return this.client.editMessage(messageId, content).then((m) => {
      if (m) this.frame({ type: "message_updated", message: m });
      return m;
    });
  }

  delete(messageId) {
    return this.client.deleteMessage(messageId).then(() => {
      const m = this.byId.get(messageId);
      if (m) this.frame({ type: "message_deleted", message: { ...m, deleted_at: new Date().toISOString() } });
    });
  }

  react(messageId, emoji) {
    return this.client.react(messageId, emoji);
  }

  unreact(messageId, emoji) {
    return this.client.unreact(messageId, emoji);
  }

  close() {
    this.stopTyping();
    super.close();
  }
}

/**
 * The user's notification socket. Events: `notification` {notification} (each
 * event id once: `{kind: "purchase"|"payment_reminder"|"shipping"|"chat", id, data}`),
 * `conversation` {event} (membership, titles, read markers), `state`. Notifications
 * are not replayed after a break (docs/notifications.md); refresh what you show.
 */
export class Notifications extends LiveSocket {
  constructor(client) {
    super(client);
    this.recent = [];
    this.recentSet = new Set();
  }

  async start() {
    await this.client.token();
    await this.connect(false);
    return this;
  }

  path() {
    return "/notifications/subscribe";
  }

  async query() {
    return { user_id: this.client.userId };
  }

  frame(f) {
    if (f.type === "notification") {
      if (f.id && this.recentSet.has(f.id)) return;
      if (f.id) {
        this.recent.push(f.id);
        this.recentSet.add(f.id);
        if (this.recent.length > RECENT_NOTIFICATION_IDS) this.recentSet.delete(this.recent.shift());
      }
      this.emit("notification", { notification: f });
    } else if (f.type === "conversation_event") {
      this.emit("conversation", { event: f.event });
    }
  }
}
