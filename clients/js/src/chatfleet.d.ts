// Types of chatfleet.js (the chatfleet browser client). The formats are those of
// docs/api.md and docs/socket-protocol.md.

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  RESYNC: 4000;
  SLOW_CONSUMER: 4001;
  HEARTBEAT_TIMEOUT: 4002;
  TOKEN_EXPIRED: 4003;
  REMOVED: 4004;
}>;

export declare const REACTIONS: readonly string[];

export interface ChatMessage {
  message_id: string;
  stream_id: string;
  sender_id: string;
  receiver_id?: string;
  recipients?: string[];
  content: string;
  created_at: string;
  client_message_id?: string;
  edited_at?: string;
  deleted_at?: string;
  version?: number;
  reactions?: Record<string, number>;
}

export interface HistoryPage {
  stream_id: string;
  messages: ChatMessage[];
  has_more: boolean;
}

export interface LastMessage {
  message_id: string;
  sender_id: string;
  /** Empty when the message was deleted. */
  excerpt: string;
  created_at: number;
  /** Epoch ms, set when the message was deleted. */
  deleted_at?: number;
}

export interface ConversationView {
  conversation_id: string;
  kind: "direct" | "group";
  title?: string;
  peer_id?: string;
  owner_id?: string;
  members: string[];
  online: string[];
  last_message: LastMessage | null;
  unread_count: number;
  updated_at: number;
}

export interface NotificationFrame {
  type: "notification";
  kind: "chat" | "purchase" | "payment_reminder" | "shipping";
  id: string;
  data: Record<string, unknown>;
}

export interface ConversationEvent {
  event_id: string;
  type: "member_joined" | "member_left" | "conversation_updated" | "read";
  conversation_id: string;
  user_id: string;
  actor_id: string;
  members: string[];
  title?: string;
  up_to?: string;
  reason?: string;
  at: string;
}

export type SocketState = "idle" | "connecting" | "live" | "reconnecting" | "closed" | "removed" | "expired";

export declare class ChatfleetError extends Error {
  /** HTTP status, 0 for a network failure. */
  status: number;
  code: string;
  retryAfterMs: number | null;
  constructor(status: number, code: string, message?: string, retryAfterMs?: number | null);
}

export declare function backoffDelay(
  attempt: number,
  options?: { baseMs?: number; maxMs?: number; random?: () => number },
): number;
export declare function parseRetryAfter(value: string | null | undefined, now?: number): number | null;
export declare function compareIds(a: string, b: string): -1 | 0 | 1;
export declare function tokenClaims(token: string): Record<string, unknown> | null;
export declare function streamIdFor(a: string, b: string): Promise<string>;
export declare function newClientMessageId(): string;

type Unsubscribe = () => void;

declare class Emitter<Events extends Record<string, object>> {
  on<K extends keyof Events>(type: K, fn: (detail: Events[K]) => void): Unsubscribe;
  off<K extends keyof Events>(type: K, fn: (detail: Events[K]) => void): void;
  /** Every event as `{type, ...detail}`; ends with an error if it falls 1000 events behind. */
  events(): AsyncIterableIterator<{ [K in keyof Events]: { type: K } & Events[K] }[keyof Events]>;
}

export interface ClientOptions {
  /** The edge's origin; default: the page's origin. */
  baseUrl?: string;
  /** Your token source; `forceRefresh` after a 401 or a 4003 close. */
  getToken: (options: { forceRefresh: boolean }) => Promise<string> | string;
  /** Default: the token's `sub`. */
  userId?: string;
  fetch?: typeof fetch;
  WebSocket?: typeof WebSocket;
  retry?: { attempts?: number; baseMs?: number; maxMs?: number; timeoutMs?: number };
  reconnect?: { baseMs?: number; maxMs?: number };
  heartbeatMs?: number;
  random?: () => number;
}

export declare class ChatfleetClient extends Emitter<Record<string, object>> {
  constructor(options: ClientOptions);
  baseUrl: string;
  userId: string | null;
  token(forceRefresh?: boolean): Promise<string>;
  static expired(token: string, now?: number): boolean;
  request<T = unknown>(
    method: string,
    path: string,
    options?: { query?: Record<string, string | number | undefined>; body?: unknown; retry?: "idempotent" | "unsafe" },
  ): Promise<T>;
  sendMessage(options: { to?: string; conversationId?: string; content: string; clientMessageId?: string }): Promise<ChatMessage>;
  history(options: {
    peerId?: string;
    conversationId?: string;
    since?: string;
    before?: string | "newest";
    limit?: number;
  }): Promise<HistoryPage>;
  editMessage(messageId: string, content: string): Promise<ChatMessage>;
  deleteMessage(messageId: string): Promise<null>;
  react(messageId: string, emoji: string): Promise<null>;
  unreact(messageId: string, emoji: string): Promise<null>;
  conversations(options?: { limit?: number; before?: string }): Promise<{ conversations: ConversationView[]; next?: string | null }>;
  conversation(conversationId: string): Promise<ConversationView>;
  createGroup(options: { title: string; members?: string[] }): Promise<ConversationView>;
  renameGroup(conversationId: string, title: string): Promise<ConversationView>;
  addMember(conversationId: string, userId: string): Promise<ConversationView>;
  removeMember(conversationId: string, userId: string): Promise<null>;
  markRead(conversationId: string, upTo: string): Promise<{ conversation_id: string; moved: boolean; unread_count: number }>;
  /** Whether `userId` has a notification socket open. Only about oneself and people one
   *  shares a conversation with; anyone else rejects with a ChatfleetError `not_a_contact` (403). */
  presence(userId: string): Promise<{ user_id: string; online: boolean }>;
  openConversation(options: { peerId?: string; conversationId?: string; presence?: boolean; historyLimit?: number }): Conversation;
  openNotifications(): Notifications;
}

interface SocketEvents {
  state: { state: SocketState; code?: number };
  close: { code: number; reason: string };
  retry: { delayMs: number; attempt: number };
  removed: { code: number };
  error: { error: unknown };
}

export interface ConversationEvents extends SocketEvents {
  message: { message: ChatMessage; source: "history" | "socket" | "sent" | "older" };
  update: { message: ChatMessage; reaction?: { userId: string; emoji: string; added: boolean } };
  delete: { message: ChatMessage };
  typing: { userId: string; typing: boolean };
  presence: { userId: string; online: boolean };
  read: { userId: string; upTo: string };
  member: { frame: Record<string, unknown> };
  resync: { reason: string };
}

export declare class Conversation extends Emitter<ConversationEvents> {
  readonly state: SocketState;
  readonly peerId: string | null;
  readonly conversationId: string | null;
  readonly isGroup: boolean;
  /** Users present in the conversation (presence=true). */
  readonly online: Set<string>;
  readonly typingUsers: Set<string>;
  /** The newest message id delivered by the conversation: the `since` of the next reconnect. */
  readonly cursor: string | null;
  readonly hasOlder: boolean;
  /** Shown messages, oldest first, each once, deleted ones excluded. */
  readonly messages: ChatMessage[];
  start(): Promise<this>;
  loadOlder(): Promise<number>;
  send(content: string, options?: { clientMessageId?: string }): Promise<ChatMessage>;
  typing(): void;
  stopTyping(): void;
  markRead(upTo?: string): Promise<unknown>;
  edit(messageId: string, content: string): Promise<ChatMessage>;
  delete(messageId: string): Promise<void>;
  react(messageId: string, emoji: string): Promise<null>;
  unreact(messageId: string, emoji: string): Promise<null>;
  reconnectNow(): void;
  close(): void;
}

export interface NotificationEvents extends SocketEvents {
  notification: { notification: NotificationFrame };
  conversation: { event: ConversationEvent };
}

export declare class Notifications extends Emitter<NotificationEvents> {
  readonly state: SocketState;
  start(): Promise<this>;
  reconnectNow(): void;
  close(): void;
}
