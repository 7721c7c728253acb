/**
 * @roomcast/client — a Roomcast client for browsers and Node.
 *
 * It keeps what API Gateway makes hard out of the application: the connection closes after two
 * hours and after ten idle minutes, so the client keeps it alive (`ping`), reconnects with
 * exponential backoff and jitter, asks for a fresh token each time, rejoins its rooms and
 * recovers what it missed with `since` — in order, before anything live, each message once —
 * and says so (`recovered: false`) when that is no longer possible. Requests return promises
 * matched to their own answers; presence is kept as a roster per room.
 *
 * ```ts
 * import { connect } from "@roomcast/client";
 * const client = connect({ url: "wss://…/prod", token: async () => fetchToken(), rooms: ["general"] });
 * client.on("message", (m) => console.log(m.room, m.user_id, m.message));
 * await client.ready();
 * await client.send("general", "hello");
 * ```
 *
 * No runtime dependency in browsers. Node 22+ has a global `WebSocket`; on Node 20 pass one:
 * `connect({ …, WebSocket: (await import("ws")).WebSocket })`.
 */

/** A chat message, as every member of its room receives it. */
export interface ChatMessage {
  /** Unique and time-ordered (UUIDv7). */
  id: string;
  room: string;
  user_id: string;
  message: string;
  /** RFC 3339, UTC, milliseconds. */
  timestamp: string;
}

/** A user present in a room, with how many connections they have in it. */
export interface PresentUser {
  user_id: string;
  connections: number;
  /** The version of the user's last `joined`: a presence frame of theirs with a lower one,
   * arriving later (from another shard), is older than this snapshot and dropped. */
  version?: number;
}

/** A change of a room's presence. */
export interface PresenceEvent {
  room: string;
  user_id: string;
  event: "joined" | "left";
  /** Why: `connect`, `join`, `leave`, `disconnect`, `expired`, `gone`, `denied`, `rate_limited`. */
  reason: string;
  /** Users present in the room after it. */
  users: number;
  /** Grows with each `joined` and `left` of this user in this room. Two shards' frames may
   * arrive in either order; the client applies only a version higher than the user's last. */
  version?: number;
}

/** What became of a reconnect's recovery in one room. */
export interface Recovery {
  room: string;
  /** False: messages may be missing — reload the room (its `history`). */
  recovered: boolean;
  reason?: string;
}

export type State = "connecting" | "open" | "reconnecting" | "closed";

/** A token, or a function that gives one: called again before every reconnect. */
export type TokenSource = string | (() => string | Promise<string>);

/** The WebSocket constructor: the browser's, Node 22's, or `ws`'s. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ConnectOptions {
  /** The WebSocket URL (`wss://{api}.execute-api.{region}.amazonaws.com/{stage}`). */
  url: string;
  token: TokenSource;
  /** Rooms to join at connect (and rejoin after every reconnect). */
  rooms?: string[];
  /** Default: `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** A `ping` this often while open; below API Gateway's 10-minute idle limit. Default 5 min. */
  pingIntervalMs?: number;
  /** The first reconnect's delay; doubled each time, with jitter, up to `maxBackoffMs`. */
  initialBackoffMs?: number;
  maxBackoffMs?: number;
  /** How long a request waits for its answer. Default 10 s. */
  requestTimeoutMs?: number;
  /** Sends kept while reconnecting; one more is refused with `QueueFullError`. Default 100. */
  maxQueuedSends?: number;
  /**
   * Attempts in a row that never open before the client gives up (state `closed`, an
   * `unreachable` error). A refused token is recognised at once where the runtime says so
   * (`ws`: 401/403); browsers do not tell, so repeated refusals end here. Attempts made while
   * the browser says it is offline do not count. Default 8 (about a minute); `Infinity` never
   * gives up.
   */
  maxFailedAttempts?: number;
  /** Message ids remembered per room to drop repeats. Default 1000. */
  dedupeWindow?: number;
  /**
   * A request answered `rate_limited` is sent again after the server's `retry_after_ms` (other
   * requests but `leave` wait too), at most this many times before it rejects with
   * `RateLimitedError`. Default 5. At most 8 such requests are on the wire at once, so a burst
   * never reaches what the server closes a connection for (three times its limit in a second).
   */
  maxRateLimitRetries?: number;
  /**
   * With a token function, the connection's token is refreshed in place this long before it
   * expires (its `exp`): the function is called and `refresh` sent, so a connection outlives its
   * token without reconnecting. Default 60 s. A static token cannot be refreshed: the server
   * answers `token_expired` after its `exp` until the client reconnects with another.
   */
  refreshBeforeMs?: number;
  /**
   * The connection is replaced by a new one (a fresh token, rooms recovered with `since`, in
   * order and once) after this long, before API Gateway closes it at two hours. Default 115 min.
   */
  maxConnectionMs?: number;
}

/** Every error this client gives. `code` is the server's (`not_member`, …) or the client's. */
export class RoomcastError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "RoomcastError";
  }
}

/** The server refused a message after accepting it (a tenant's rules). */
export class RejectedError extends RoomcastError {
  constructor(
    readonly id: string,
    readonly reason: string,
  ) {
    super("rejected", reason);
    this.name = "RejectedError";
  }
}

/** A join the tenant's rules, or the token's `rooms` claim, refused. */
export class JoinDeniedError extends RoomcastError {
  constructor(
    readonly room: string,
    readonly reason: string,
  ) {
    super("join_denied", reason);
    this.name = "JoinDeniedError";
  }
}

/** The connection was refused at its upgrade (401/403: a bad or expired token). Not retried. */
export class AuthError extends RoomcastError {
  constructor(message: string) {
    super("unauthorized", message);
    this.name = "AuthError";
  }
}

/** Too many sends are waiting for the connection to come back. */
export class QueueFullError extends RoomcastError {
  constructor(limit: number) {
    super("queue_full", `${limit} sends are already waiting for the connection to come back`);
    this.name = "QueueFullError";
  }
}

/** Over a rate limit, after `maxRateLimitRetries` waits of `retryAfterMs` each. */
export class RateLimitedError extends RoomcastError {
  constructor(
    message: string,
    /** When the server said to try again, in milliseconds. */
    readonly retryAfterMs: number,
  ) {
    super("rate_limited", message);
    this.name = "RateLimitedError";
  }
}

/** Requests the server does not rate-limit (a connection can always leave). */
const UNLIMITED = new Set(["leave"]);
const isLimited = (frame: Record<string, unknown>) => !UNLIMITED.has(String(frame.action));

/** Rate-limited requests on the wire at once: a burst (a queue flushed after a reconnect,
 * `Promise.all` of many sends) goes out as answers come back, so that it never reaches the
 * three times its limit in a second at which the server closes a connection. */
const MAX_LIMITED_IN_FLIGHT = 8;

/** The server's welcome: who this connection is, and the rooms it is in now. */
export interface Welcome {
  connection_id: string;
  tenant: string;
  user_id: string;
  /** Rooms joined (a room waiting for the tenant's rules follows with its own ack). */
  rooms: string[];
  greeting?: string;
  /** Users present per room as the welcome was sent. */
  counts?: Record<string, number>;
  /** The labels given at connect (`?deployment_id=`, `?connection_type=`), if any. */
  deployment_id?: string;
  connection_type?: string;
}

export interface Events {
  state: (state: State) => void;
  /** Every (re)connect's welcome. */
  welcome: (welcome: Welcome) => void;
  message: (message: ChatMessage) => void;
  presence: (event: PresenceEvent) => void;
  /** A room's roster changed (a snapshot arrived, or a presence event): `roster(room)` has it. */
  roster: (room: string) => void;
  /** The tenant's backend took this connection out of a room (`leave_user`); the client no
   * longer counts it among its rooms and does not rejoin it on a reconnect. */
  left: (room: string) => void;
  /** After a reconnect, per room: whether every missed message was delivered. */
  recovered: (recovery: Recovery) => void;
  /** A sent message the tenant's rules refused after the ack. */
  rejected: (error: RejectedError) => void;
  join_denied: (error: JoinDeniedError) => void;
  signal: (signal: { id: string; room: string; user_id: string; data: unknown }) => void;
  /** A message from the tenant's backend to this user (`send_to_user`), in whatever rooms they
   * are: once per id, however often it is redelivered. */
  userMessage: (message: UserMessage) => void;
  /** Connection-level trouble (the client goes on, unless it is an `AuthError`). */
  error: (error: RoomcastError) => void;
}

/** A backend's message to this user, not to a room: not kept in any room's history. */
export interface UserMessage {
  id: string;
  /** Who the backend says it is from. */
  from: string;
  message: string;
  timestamp: string;
}

/** A join's answer: the room's users as it was acknowledged. */
export interface JoinAck {
  room: string;
  users: number;
  members: PresentUser[];
}

export interface HistoryPage {
  room: string;
  messages: ChatMessage[];
  /** More: pass it as `before` (backward) or `after` (forward). */
  next?: string;
}

interface Pending {
  resolve: (value: Record<string, unknown>) => void;
  reject: (error: RoomcastError) => void;
  timer: ReturnType<typeof setTimeout>;
  frame: Record<string, unknown>;
  /** Times it was refused as rate limited. */
  limited: number;
}

interface Paced {
  frame: Record<string, unknown>;
  resolve: (v: Record<string, unknown>) => void;
  reject: (e: RoomcastError) => void;
  limited: number;
}

interface Queued {
  frame: Record<string, unknown>;
  resolve: (v: Record<string, unknown>) => void;
  reject: (e: RoomcastError) => void;
}

interface RoomState {
  /** The last message delivered, for `since`. */
  lastId?: string;
  seen: Set<string>;
  seenOrder: string[];
  roster: Map<string, number>;
  /** Users present, as the server last counted them (it may list only the first few). */
  count?: number;
  /** Presence events that arrived while a snapshot (`who`, a join's ack) was on its way: applied
   * again on top of it, so a snapshot taken before them does not undo them. */
  sinceSnapshot?: PresenceEvent[];
  /** Per user, the highest presence `version` applied: a lower one arriving later is stale. */
  versions: Map<string, number>;
  /** Messages held while the room recovers, then delivered in order. */
  held?: ChatMessage[];
  joined: boolean;
}

const OPEN = 1;

/** Opens a client; it connects at once and keeps the connection until `close()`. */
export function connect(options: ConnectOptions): RoomcastClient {
  return new RoomcastClient(options);
}

export class RoomcastClient {
  #options: Required<Omit<ConnectOptions, "WebSocket" | "rooms">> & { rooms: string[] };
  #WebSocket: WebSocketConstructor;
  #socket?: WebSocketLike;
  #state: State = "connecting";
  #listeners = new Map<keyof Events, Set<(...args: never[]) => void>>();
  #pending = new Map<string, Pending>();
  #queue: Queued[] = [];
  #rooms = new Map<string, RoomState>();
  #joinWaiters = new Map<string, { resolve: (a: JoinAck) => void; reject: (e: RoomcastError) => void }[]>();
  #nextRef = 0;
  #attempt = 0;
  #pingTimer?: ReturnType<typeof setInterval>;
  #retryTimer?: ReturnType<typeof setTimeout>;
  #readyWaiters: { resolve: () => void; reject: (e: RoomcastError) => void }[] = [];
  #stopped = false;
  #connectionId?: string;
  #userId?: string;
  #duplicates = 0;
  /** Ids of the user messages already emitted (the last `dedupeWindow`), oldest first. */
  #userMessages = new Set<string>();
  #userMessageOrder: string[] = [];
  #stale = 0;
  #reconnecting = false;
  #failedAttempts = 0;
  #recoverTimer?: ReturnType<typeof setTimeout>;
  /** Until when (epoch ms) rate-limited requests wait: the server said so. */
  #holdUntil = 0;
  #rateLimited = 0;
  /** Limited requests waiting for the hold to end or for room on the wire, in order. */
  #paced: Paced[] = [];
  #limitedInFlight = 0;
  #pacer?: ReturnType<typeof setTimeout>;
  /** The token this connection holds, as last sent (at connect or by `refresh`). */
  #token?: string;
  #refreshTimer?: ReturnType<typeof setTimeout>;
  #rolloverTimer?: ReturnType<typeof setTimeout>;
  #refreshes = 0;
  #rollovers = 0;
  /** The refresh under way, if any: one at a time. */
  #refreshing?: Promise<void>;

  constructor(options: ConnectOptions) {
    const WebSocketImpl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WebSocketImpl) {
      throw new RoomcastError(
        "no_websocket",
        "no WebSocket implementation: pass one (connect({ …, WebSocket })), e.g. the `ws` package's on Node 20",
      );
    }
    this.#WebSocket = WebSocketImpl;
    this.#options = {
      url: options.url,
      token: options.token,
      rooms: [...(options.rooms ?? [])],
      pingIntervalMs: options.pingIntervalMs ?? 5 * 60_000,
      initialBackoffMs: options.initialBackoffMs ?? 500,
      maxBackoffMs: options.maxBackoffMs ?? 30_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      maxQueuedSends: options.maxQueuedSends ?? 100,
      dedupeWindow: options.dedupeWindow ?? 1000,
      maxFailedAttempts: options.maxFailedAttempts ?? 8,
      maxRateLimitRetries: options.maxRateLimitRetries ?? 5,
      refreshBeforeMs: options.refreshBeforeMs ?? 60_000,
      maxConnectionMs: options.maxConnectionMs ?? 115 * 60_000,
    };
    for (const room of this.#options.rooms) {
      this.#room(room).joined = true;
    }
    void this.#open();
  }

  /** `connecting`, `open`, `reconnecting` or `closed`. */
  get state(): State {
    return this.#state;
  }

  /** This connection's id (API Gateway's), once open. */
  get connectionId(): string | undefined {
    return this.#connectionId;
  }

  /** The user the token identified, once open. */
  get userId(): string | undefined {
    return this.#userId;
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<E extends keyof Events>(event: E, listener: Events[E]): () => void {
    let set = this.#listeners.get(event);
    if (!set) {
      set = new Set();
      this.#listeners.set(event, set);
    }
    set.add(listener as (...args: never[]) => void);
    return () => set.delete(listener as (...args: never[]) => void);
  }

  /** Resolves when the connection is open (now, or after the next reconnect). */
  ready(): Promise<void> {
    if (this.#state === "open") return Promise.resolve();
    if (this.#state === "closed") return Promise.reject(new RoomcastError("closed", "the client is closed"));
    return new Promise((resolve, reject) => this.#readyWaiters.push({ resolve, reject }));
  }

  /** Repeats dropped so far: messages and presence events seen before (a redelivered batch, a
   * recovery's overlap). */
  get duplicatesDropped(): number {
    return this.#duplicates;
  }

  /** Tokens refreshed in place so far (`refresh`), and connections replaced before the
   * maximum connection duration. */
  get tokensRefreshed(): number {
    return this.#refreshes;
  }

  get connectionsReplaced(): number {
    return this.#rollovers;
  }

  /** Presence events dropped as older than one already applied for the same user (frames from
   * two shards that arrived the other way round). */
  get stalePresenceDropped(): number {
    return this.#stale;
  }

  /** Users present in a room, as the server last counted them (the roster may hold only the
   * first page of a large room). */
  count(room: string): number {
    const state = this.#rooms.get(room);
    if (!state) return 0;
    return Math.max(state.count ?? 0, state.roster.size);
  }

  /** The rooms this client is in (joined, and not waiting for a decision). */
  get rooms(): string[] {
    return [...this.#rooms.entries()].filter(([, s]) => s.joined).map(([room]) => room).sort();
  }

  /** The users present in a room, as this client knows them (from the join and presence). */
  roster(room: string): PresentUser[] {
    const state = this.#rooms.get(room);
    if (!state) return [];
    return [...state.roster.entries()]
      .map(([user_id, connections]) => ({ user_id, connections }))
      .sort((a, b) => a.user_id.localeCompare(b.user_id));
  }

  /** Joins a room: resolves with its users, or rejects with `JoinDeniedError`. */
  async join(room: string): Promise<JoinAck> {
    const state = this.#room(room);
    const wasJoined = state.joined;
    state.joined = true;
    this.#startSnapshot(room);
    const waited = new Promise<JoinAck>((resolve, reject) => {
      const list = this.#joinWaiters.get(room) ?? [];
      list.push({ resolve, reject });
      this.#joinWaiters.set(room, list);
    });
    // When the request itself fails, that failure is what this call rejects with.
    waited.catch(() => undefined);
    // The answer may be the ack itself, or `pending` and later the ack or `join_denied`
    // from the server once the tenant's rules decided.
    const answer = await this.#request({ action: "join", room }).catch((error: RoomcastError) => {
      // Refused: the room is not rejoined on the next reconnect.
      if (!wasJoined && this.#rooms.get(room) === state) state.joined = false;
      this.#settleJoin(room, error);
      throw error;
    });
    if (answer.pending) {
      // The tenant's rules decide: the server's ack or `join_denied` follows, or nothing does.
      const timer = setTimeout(() => {
        this.#settleJoin(room, new RoomcastError("timeout", `no decision on joining ${room} within ${this.#options.requestTimeoutMs} ms`));
      }, this.#options.requestTimeoutMs);
      void waited.finally(() => clearTimeout(timer)).catch(() => undefined);
    }
    if (answer.action === "ack" && !answer.pending) this.#onJoinAck(answer);
    return waited;
  }

  /** Leaves a room; its roster is dropped. */
  async leave(room: string): Promise<void> {
    const state = this.#rooms.get(room);
    if (state) state.joined = false;
    await this.#request({ action: "leave", room });
    this.#rooms.delete(room);
  }

  /**
   * Sends a message; resolves with its id once written. While reconnecting, it waits in a
   * bounded queue. An idempotency key (made up when not given) makes a resend after a
   * reconnect write the message once.
   */
  async send(room: string, message: string, options: { idempotencyKey?: string } = {}): Promise<{ id: string }> {
    const key = options.idempotencyKey ?? randomKey();
    const answer = await this.#request({ action: "sendMessage", room, message, idempotency_key: key }, true);
    return { id: String(answer.id) };
  }

  /** A page of history: the newest, or before / after a cursor (a message id or a page's `next`). */
  async history(room: string, options: { limit?: number; before?: string; after?: string } = {}): Promise<HistoryPage> {
    const frame: Record<string, unknown> = { action: "history", room };
    if (options.limit !== undefined) frame.limit = options.limit;
    if (options.before !== undefined) frame.before = options.before;
    if (options.after !== undefined) frame.after = options.after;
    const answer = await this.#request(frame);
    return {
      room,
      messages: (answer.messages as ChatMessage[]) ?? [],
      ...(answer.next ? { next: String(answer.next) } : {}),
    };
  }

  /** Who is in a room now, from the server (every page); the roster is refreshed with it. */
  async who(room: string): Promise<PresentUser[]> {
    const users: PresentUser[] = [];
    let after: string | undefined;
    this.#startSnapshot(room);
    for (;;) {
      const answer = await this.#request({ action: "who", room, ...(after ? { after } : {}) });
      users.push(...((answer.users as PresentUser[]) ?? []));
      if (!answer.next) break;
      after = String(answer.next);
    }
    const state = this.#rooms.get(room);
    if (state) {
      this.#applySnapshot(state, users, users.length);
      this.#emit("roster", room);
    }
    return users;
  }

  /** An ephemeral event (typing, a cursor) for the room's other members. */
  async signal(room: string, data: unknown): Promise<void> {
    await this.#request({ action: "signal", room, data });
  }

  /** Stops: no reconnect; waiting requests and sends reject. */
  close(): void {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#recoverTimer);
    this.#stopTimers();
    this.#stopPing();
    const socket = this.#socket;
    this.#socket = undefined;
    if (socket) {
      socket.onclose = null;
      socket.onmessage = null;
      // `ws` emits an error for a socket closed before it opened: keep a listener for it.
      socket.onerror = () => undefined;
      try {
        socket.close(1000, "client closed");
      } catch {
        // already closing
      }
    }
    this.#fail(new RoomcastError("closed", "the client was closed"));
    this.#setState("closed");
  }

  // --- the connection -----------------------------------------------------------------------

  async #open(): Promise<void> {
    let token: string;
    try {
      const source = this.#options.token;
      token = typeof source === "function" ? await source() : source;
    } catch (error) {
      this.#emit("error", new RoomcastError("token", `the token function failed: ${describe(error)}`));
      this.#scheduleReconnect();
      return;
    }
    if (this.#stopped) return;
    this.#token = token;
    const query = new URLSearchParams({ token });
    const rooms = [...this.#rooms.entries()].filter(([, s]) => s.joined).map(([room]) => room);
    if (rooms.length) query.set("rooms", rooms.join(","));
    const since = [...this.#rooms.entries()]
      .filter(([, s]) => s.joined && s.lastId)
      .map(([room, s]) => `${room}:${s.lastId}`);
    if (since.length) query.set("since", since.join(","));
    // Rooms recovering hold their live messages until their `recover` frame.
    this.#reconnecting = Boolean(this.#connectionId);
    for (const state of this.#rooms.values()) {
      if (state.joined && state.lastId) state.held = [];
      else delete state.held;

    }
    const separator = this.#options.url.includes("?") ? "&" : "?";
    let socket: WebSocketLike;
    try {
      socket = new this.#WebSocket(`${this.#options.url}${separator}${query}`);
    } catch (error) {
      this.#emit("error", new RoomcastError("connect", describe(error)));
      this.#scheduleReconnect();
      return;
    }
    this.#socket = socket;
    let opened = false;
    let refusal: string | undefined;
    socket.onopen = () => {
      opened = true;
    };
    socket.onerror = (event: unknown) => {
      // `ws` says why an upgrade failed ("Unexpected server response: 401"); browsers do not.
      const text = describe((event as { error?: unknown })?.error ?? (event as { message?: unknown })?.message ?? "");
      if (/\b(401|403)\b/.test(text)) refusal = text;
    };
    socket.onmessage = (event) => this.#onFrame(String(event.data));
    socket.onclose = (event) => {
      if (this.#socket !== socket) return;
      this.#socket = undefined;
      this.#stopPing();
      this.#stopTimers();
      if (!opened && refusal) {
        // A refused token is final: retrying would only be refused again.
        const error = new AuthError(`the connection was refused: ${refusal}`);
        this.#stopped = true;
        this.#emit("error", error);
        this.#fail(error);
        this.#setState("closed");
        return;
      }
      this.#rejectInFlight(event.code);
      if (this.#stopped) {
        // Told `terminated`: the client ends here.
        this.#fail(new RoomcastError("terminated", "the service disconnected this user"));
        this.#setState("closed");
        return;
      }
      const offline = (globalThis as { navigator?: { onLine?: boolean } }).navigator?.onLine === false;
      if (!opened && !offline) this.#failedAttempts += 1;
      if (this.#failedAttempts >= this.#options.maxFailedAttempts) {
        const error = new RoomcastError(
          "unreachable",
          `${this.#failedAttempts} connection attempts in a row never opened (a refused token, or the server unreachable)`,
        );
        this.#stopped = true;
        this.#emit("error", error);
        this.#fail(error);
        this.#setState("closed");
        return;
      }
      this.#scheduleReconnect();
    };
  }

  #scheduleReconnect(): void {
    if (this.#stopped) return;
    this.#setState(this.#connectionId ? "reconnecting" : "connecting");
    const base = Math.min(this.#options.maxBackoffMs, this.#options.initialBackoffMs * 2 ** this.#attempt);
    this.#attempt += 1;
    // Full jitter: many clients dropped together do not come back together.
    const delay = Math.round(base / 2 + Math.random() * (base / 2));
    this.#retryTimer = setTimeout(() => void this.#open(), delay);
  }

  #setState(state: State): void {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit("state", state);
    if (state === "open") {
      for (const waiter of this.#readyWaiters.splice(0)) waiter.resolve();
    }
  }

  #startPing(): void {
    this.#stopPing();
    this.#pingTimer = setInterval(() => {
      this.#request({ action: "ping" }).catch((error: RoomcastError) => {
        // No answer: the connection is dead though it looks open (a sleep, a network change).
        if (error.code === "timeout") this.#socket?.close(4000, "ping timeout");
      });
    }, this.#options.pingIntervalMs);
    (this.#pingTimer as { unref?: () => void }).unref?.();
  }

  #stopPing(): void {
    clearInterval(this.#pingTimer);
    this.#pingTimer = undefined;
  }

  #stopTimers(): void {
    clearTimeout(this.#refreshTimer);
    clearTimeout(this.#rolloverTimer);
    this.#refreshTimer = undefined;
    this.#rolloverTimer = undefined;
  }

  /** Refreshes the token `refreshBeforeMs` before its `exp` (with a token function only), at
   * least `MIN_REFRESH_MS` from now; not at all when the connection is replaced first. */
  #scheduleRefresh(): void {
    clearTimeout(this.#refreshTimer);
    const exp = this.#token ? tokenExpiry(this.#token) : undefined;
    if (exp === undefined || typeof this.#options.token !== "function") return;
    const wait = Math.max(MIN_REFRESH_MS, exp * 1000 - Date.now() - this.#options.refreshBeforeMs);
    if (wait >= this.#options.maxConnectionMs) return;
    this.#refreshTimer = setTimeout(() => void this.#refresh(), wait);
    (this.#refreshTimer as { unref?: () => void }).unref?.();
  }

  /** A new token from the token function, sent with `refresh`; a refusal is an `error` event.
   * One at a time: a second call while one is under way joins it. */
  #refresh(): Promise<void> {
    this.#refreshing ??= this.#refreshOnce().finally(() => (this.#refreshing = undefined));
    return this.#refreshing;
  }

  async #refreshOnce(): Promise<void> {
    const source = this.#options.token;
    if (typeof source !== "function" || this.#state !== "open") return;
    let token: string;
    try {
      token = await source();
    } catch (error) {
      this.#emit("error", new RoomcastError("token", `the token function failed: ${describe(error)}`));
      return;
    }
    try {
      await this.#request({ action: "refresh", token });
      this.#token = token;
      this.#refreshes++;
    } catch (error) {
      this.#emit("error", error as RoomcastError);
    }
    // Again before the new token expires (a token no later than the last: after the minimum).
    this.#scheduleRefresh();
  }

  /** Replaces the connection before API Gateway's two-hour limit: closed here, reopened at once
   * with a fresh token, its rooms recovered with `since`. */
  #scheduleRollover(): void {
    clearTimeout(this.#rolloverTimer);
    const replace = (waited: number) => {
      const socket = this.#socket;
      if (!socket || this.#stopped) return;
      // Requests in flight finish first (up to a few seconds; sends would be sent again anyway).
      if (this.#pending.size > 0 && waited < ROLLOVER_WAIT_MS) {
        this.#rolloverTimer = setTimeout(() => replace(waited + 100), 100);
        return;
      }
      this.#rollovers++;
      this.#attempt = 0;
      socket.close(4001, "replaced before the maximum connection duration");
    };
    this.#rolloverTimer = setTimeout(() => replace(0), Math.min(this.#options.maxConnectionMs, MAX_TIMER_MS));
    (this.#rolloverTimer as { unref?: () => void }).unref?.();
  }

  // --- requests -----------------------------------------------------------------------------

  #request(frame: Record<string, unknown>, queueable = false): Promise<Record<string, unknown>> {
    if (this.#stopped) return Promise.reject(new RoomcastError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      if (this.#socket?.readyState === OPEN && this.#state === "open") {
        this.#transmit(frame, resolve, reject);
      } else if (queueable) {
        if (this.#queue.length >= this.#options.maxQueuedSends) {
          reject(new QueueFullError(this.#options.maxQueuedSends));
          return;
        }
        this.#queue.push({ frame, resolve, reject });
      } else {
        reject(new RoomcastError("not_connected", `not connected (${this.#state}): ${String(frame.action)} needs an open connection`));
      }
    });
  }

  #transmit(
    frame: Record<string, unknown>,
    resolve: (v: Record<string, unknown>) => void,
    reject: (e: RoomcastError) => void,
    limited = 0,
  ): void {
    if (isLimited(frame)) {
      // The server said when (a request sent before then would only be refused again), or the
      // wire has its share of limited requests: wait, in order (a retry first).
      if (this.#paced.length > 0 || Date.now() < this.#holdUntil || this.#limitedInFlight >= MAX_LIMITED_IN_FLIGHT) {
        const waiting = { frame, resolve, reject, limited };
        if (limited > 0) this.#paced.unshift(waiting);
        else this.#paced.push(waiting);
        this.#pace();
        return;
      }
      this.#limitedInFlight++;
    }
    this.#onTheWire(frame, resolve, reject, limited);
  }

  /** Puts one request on the wire under a fresh `ref`, rejected if no answer comes in time. */
  #onTheWire(
    frame: Record<string, unknown>,
    resolve: (v: Record<string, unknown>) => void,
    reject: (e: RoomcastError) => void,
    limited: number,
  ): void {
    const ref = `r${++this.#nextRef}`;
    const timer = setTimeout(() => {
      this.#settled(ref);
      reject(new RoomcastError("timeout", `no answer to ${String(frame.action)} within ${this.#options.requestTimeoutMs} ms`));
    }, this.#options.requestTimeoutMs);
    this.#pending.set(ref, { resolve, reject, timer, frame, limited });
    this.#socket!.send(JSON.stringify({ ...frame, ref }));
  }

  /** A request no longer on the wire: its place goes to the next limited one waiting. */
  #settled(ref: string): Pending | undefined {
    const pending = this.#pending.get(ref);
    if (!pending) return undefined;
    this.#pending.delete(ref);
    clearTimeout(pending.timer);
    if (isLimited(pending.frame)) {
      this.#limitedInFlight = Math.max(0, this.#limitedInFlight - 1);
      this.#pace();
    }
    return pending;
  }

  /** Sends what waits, as far as the hold and the wire allow; wakes up when the hold ends. */
  #pace(): void {
    if (this.#pacer) return;
    const wait = this.#holdUntil - Date.now();
    if (wait > 0) {
      this.#pacer = setTimeout(() => {
        this.#pacer = undefined;
        this.#pace();
      }, wait);
      (this.#pacer as { unref?: () => void }).unref?.();
      return;
    }
    while (this.#paced.length > 0 && this.#limitedInFlight < MAX_LIMITED_IN_FLIGHT && Date.now() >= this.#holdUntil) {
      const next = this.#paced.shift()!;
      if (this.#socket?.readyState === OPEN && this.#state === "open") {
        this.#limitedInFlight++;
        this.#onTheWire(next.frame, next.resolve, next.reject, next.limited);
      } else {
        this.#resend(next.frame, next.resolve, next.reject, next.limited);
      }
    }
  }

  /** A request held or refused as rate limited, sent again: now if open, else queued (sends)
   * or failed like any request made while not connected. */
  #resend(
    frame: Record<string, unknown>,
    resolve: (v: Record<string, unknown>) => void,
    reject: (e: RoomcastError) => void,
    limited: number,
  ): void {
    if (this.#stopped) {
      reject(new RoomcastError("closed", "the client is closed"));
    } else if (this.#socket?.readyState === OPEN && this.#state === "open") {
      this.#transmit(frame, resolve, reject, limited);
    } else if (frame.action === "sendMessage" && this.#queue.length < this.#options.maxQueuedSends) {
      this.#queue.push({ frame, resolve, reject });
    } else {
      reject(new RoomcastError("not_connected", `not connected (${this.#state}): ${String(frame.action)} needs an open connection`));
    }
  }

  /** Requests refused as rate limited and sent again (or given up on). */
  get rateLimited(): number {
    return this.#rateLimited;
  }

  /** The socket closed: sends in flight go back to the queue (their idempotency key makes the
   * resend safe); other requests fail. */
  #rejectInFlight(code: number): void {
    const requeued: Queued[] = [];
    for (const [ref, pending] of this.#pending) {
      clearTimeout(pending.timer);
      this.#pending.delete(ref);
      if (pending.frame.action === "sendMessage" && this.#queue.length + requeued.length < this.#options.maxQueuedSends) {
        requeued.push({ frame: pending.frame, resolve: pending.resolve, reject: pending.reject });
      } else {
        pending.reject(new RoomcastError("disconnected", `the connection closed (${code}) before the answer`));
      }
    }
    // Limited requests still waiting to go: sends wait for the reconnect with the rest.
    for (const waiting of this.#paced.splice(0)) {
      if (waiting.frame.action === "sendMessage" && this.#queue.length + requeued.length < this.#options.maxQueuedSends) {
        requeued.push({ frame: waiting.frame, resolve: waiting.resolve, reject: waiting.reject });
      } else {
        waiting.reject(new RoomcastError("disconnected", `the connection closed (${code}) before it was sent`));
      }
    }
    this.#limitedInFlight = 0;
    // In the order they were sent, before anything queued since.
    this.#queue.unshift(...requeued);
  }

  #fail(error: RoomcastError): void {
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(error);
    }
    this.#pending.clear();
    this.#limitedInFlight = 0;
    if (this.#pacer) clearTimeout(this.#pacer);
    this.#pacer = undefined;
    for (const waiting of this.#paced.splice(0)) waiting.reject(error);
    for (const queued of this.#queue.splice(0)) queued.reject(error);
    for (const waiter of this.#readyWaiters.splice(0)) waiter.reject(error);
    for (const [room] of this.#joinWaiters) this.#settleJoin(room, error);
  }

  // --- frames -------------------------------------------------------------------------------

  #onFrame(text: string): void {
    let frame: Record<string, unknown>;
    try {
      frame = JSON.parse(text);
    } catch {
      this.#emit("error", new RoomcastError("bad_frame", `a frame that is not JSON: ${text.slice(0, 80)}`));
      return;
    }
    const ref = typeof frame.ref === "string" ? frame.ref : undefined;
    if (ref && this.#pending.has(ref)) {
      if (frame.action === "error" && frame.code === "rate_limited") {
        // Held before its place on the wire is given up, so nothing waiting goes out early.
        const after = typeof frame.retry_after_ms === "number" ? frame.retry_after_ms : 1000;
        this.#holdUntil = Math.max(this.#holdUntil, Date.now() + after + Math.floor(Math.random() * 50));
      }
      const pending = this.#settled(ref)!;
      if (frame.action === "error" && frame.code === "rate_limited" && isLimited(pending.frame)) {
        this.#rateLimited++;
        const after = typeof frame.retry_after_ms === "number" ? frame.retry_after_ms : 1000;
        if (pending.limited >= this.#options.maxRateLimitRetries) {
          pending.reject(new RateLimitedError(String(frame.message), after));
        } else {
          // Every limited request waits with it (the hold above, with a little jitter).
          this.#transmit(pending.frame, pending.resolve, pending.reject, pending.limited + 1);
        }
      } else if (frame.action === "error") {
        // The token ran out before a refresh could replace it: refresh now.
        if (frame.code === "token_expired") void this.#refresh();
        pending.reject(new RoomcastError(String(frame.code), String(frame.message)));
      } else if (frame.action === "join_denied") {
        const denied = new JoinDeniedError(String(frame.room), String(frame.reason));
        pending.reject(denied);
        this.#onJoinDenied(denied);
      } else {
        pending.resolve(frame);
      }
      return;
    }
    switch (frame.action) {
      case "welcome":
        this.#onWelcome(frame);
        break;
      case "message":
        this.#onMessage(frame as unknown as ChatMessage);
        break;
      case "recover":
        this.#onRecover(frame);
        break;
      case "presence":
        this.#onPresence(frame);
        break;
      case "ack":
        // A join the tenant's rules allowed, after a `pending` answer or at connect.
        if (frame.request === "join" && !frame.pending) this.#onJoinAck(frame);
        // The tenant's backend took this connection out of the room (`leave_user`): forget it,
        // so a reconnect does not rejoin it.
        else if (frame.request === "leave") this.#onServerLeave(String(frame.room));
        break;
      case "join_denied":
        this.#onJoinDenied(new JoinDeniedError(String(frame.room), String(frame.reason)));
        break;
      case "rejected":
        this.#emit("rejected", new RejectedError(String(frame.id), String(frame.reason)));
        break;
      case "signal":
        this.#emit("signal", frame as never);
        break;
      case "user_message":
        this.#onUserMessage(frame as unknown as UserMessage);
        break;
      case "error":
        // The service disconnected this user: reconnecting would only be refused (or undo it).
        if (frame.code === "terminated") this.#stopped = true;
        this.#emit("error", new RoomcastError(String(frame.code), String(frame.message)));
        break;
      default:
        break;
    }
  }

  #onWelcome(frame: Record<string, unknown>): void {
    this.#connectionId = String(frame.connection_id);
    this.#userId = String(frame.user_id);
    this.#attempt = 0;
    this.#failedAttempts = 0;
    for (const room of (frame.rooms as string[]) ?? []) this.#room(room).joined = true;
    this.#setState("open");
    this.#emit("welcome", frame as unknown as Welcome);
    this.#startPing();
    this.#scheduleRefresh();
    this.#scheduleRollover();
    // Rosters start from the server's view of each room the welcome names.
    for (const room of (frame.rooms as string[]) ?? []) {
      this.who(room).catch((error) => this.#emit("error", error));
    }
    // Sends to a room still waiting for the tenant's rules wait for its ack.
    const welcomed = new Set((frame.rooms as string[]) ?? []);
    const waiting = this.#queue.filter((q) => this.#rooms.get(String(q.frame.room))?.joined && !welcomed.has(String(q.frame.room)));
    for (const queued of this.#queue.splice(0)) {
      if (waiting.includes(queued)) this.#queue.push(queued);
      else this.#transmit(queued.frame, queued.resolve, queued.reject);
    }
    if (this.#reconnecting) {
      for (const [room, state] of this.#rooms) {
        // Nothing seen there before the drop: what came meanwhile cannot be asked for.
        if (state.joined && !state.lastId && welcomed.has(room)) {
          this.#emit("recovered", { room, recovered: false, reason: "no message was seen in this room before the connection dropped: reload it" });
        }
      }
    }
    // A recovery whose `recover` frame never comes (a room denied, a frame lost) lets its
    // held messages go after a while, and says so.
    clearTimeout(this.#recoverTimer);
    this.#recoverTimer = setTimeout(() => {
      for (const [room, state] of this.#rooms) {
        if (state.held && welcomed.has(room)) this.#onRecover({ room, recovered: false, reason: "no recovery answer came" });
      }
    }, this.#options.requestTimeoutMs);
    (this.#recoverTimer as { unref?: () => void }).unref?.();
  }

  /** Sends that waited for a room's decision: its ack came. */
  #flushRoom(room: string): void {
    if (this.#state !== "open") return;
    const ready = this.#queue.filter((q) => String(q.frame.room) === room);
    this.#queue = this.#queue.filter((q) => String(q.frame.room) !== room);
    for (const queued of ready) this.#transmit(queued.frame, queued.resolve, queued.reject);
  }

  #onServerLeave(room: string): void {
    if (!this.#rooms.delete(room)) return;
    this.#emit("left", room);
    this.#emit("roster", room);
  }

  #onJoinAck(frame: Record<string, unknown>): void {
    const room = String(frame.room);
    const state = this.#room(room);
    const members = (frame.members as PresentUser[]) ?? [];
    state.joined = true;
    this.#applySnapshot(state, members, Number(frame.users ?? members.length));
    this.#emit("roster", room);
    const ack: JoinAck = { room, users: Number(frame.users ?? members.length), members };
    for (const waiter of this.#joinWaiters.get(room) ?? []) waiter.resolve(ack);
    this.#joinWaiters.delete(room);
    this.#flushRoom(room);
  }

  #onJoinDenied(error: JoinDeniedError): void {
    const state = this.#rooms.get(error.room);
    if (state) state.joined = false;
    this.#rooms.delete(error.room);
    this.#emit("join_denied", error);
    this.#settleJoin(error.room, error);
    const refused = this.#queue.filter((q) => String(q.frame.room) === error.room);
    this.#queue = this.#queue.filter((q) => String(q.frame.room) !== error.room);
    for (const queued of refused) queued.reject(error);
  }

  #settleJoin(room: string, error: RoomcastError): void {
    for (const waiter of this.#joinWaiters.get(room) ?? []) waiter.reject(error);
    this.#joinWaiters.delete(room);
  }

  #onMessage(message: ChatMessage): void {
    // A room this client left (or never joined): nothing of it is delivered.
    const state = this.#rooms.get(message.room);
    if (!state) return;
    if (state.held) {
      state.held.push(message);
      return;
    }
    this.#deliver(state, message);
  }

  #onUserMessage(message: UserMessage): void {
    if (this.#userMessages.has(message.id)) {
      this.#duplicates += 1;
      return;
    }
    this.#userMessages.add(message.id);
    this.#userMessageOrder.push(message.id);
    while (this.#userMessageOrder.length > this.#options.dedupeWindow) {
      this.#userMessages.delete(this.#userMessageOrder.shift()!);
    }
    this.#emit("userMessage", message);
  }

  #deliver(state: RoomState, message: ChatMessage): void {
    if (state.seen.has(message.id)) {
      this.#duplicates += 1;
      return;
    }
    state.seen.add(message.id);
    state.seenOrder.push(message.id);
    while (state.seenOrder.length > this.#options.dedupeWindow) {
      state.seen.delete(state.seenOrder.shift()!);
    }
    if (!state.lastId || compareMessages(message, { id: state.lastId, timestamp: "" }) > 0) {
      state.lastId = message.id;
    }
    this.#emit("message", message);
  }

  #onRecover(frame: Record<string, unknown>): void {
    const room = String(frame.room);
    const state = this.#room(room);
    const recovered = Boolean(frame.recovered);
    const held = state.held ?? [];
    delete state.held;
    // What was missed, then what arrived live meanwhile: in order, each once.
    const messages = [...((frame.messages as ChatMessage[]) ?? []), ...held].sort(compareMessages);
    for (const message of messages) this.#deliver(state, message);
    this.#emit("recovered", { room, recovered, ...(frame.reason ? { reason: String(frame.reason) } : {}) });
  }

  #onPresence(frame: Record<string, unknown>): void {
    const event = frame as unknown as PresenceEvent & { id?: string };
    const state = this.#rooms.get(event.room);
    if (!state) return;
    if (event.id) {
      if (state.seen.has(`p:${event.id}`)) {
        this.#duplicates += 1;
        return;
      }
      state.seen.add(`p:${event.id}`);
      state.seenOrder.push(`p:${event.id}`);
    }
    if (typeof event.version === "number" && event.version > 0) {
      // The user's later transition was applied already (it came from another shard first).
      if ((state.versions.get(event.user_id) ?? 0) >= event.version) {
        this.#stale += 1;
        return;
      }
      state.versions.set(event.user_id, event.version);
    }
    state.sinceSnapshot?.push(event);
    applyPresence(state, event);
    this.#emit("roster", event.room);
    this.#emit("presence", {
      room: event.room,
      user_id: event.user_id,
      event: event.event,
      reason: event.reason,
      users: event.users,
      ...(typeof event.version === "number" ? { version: event.version } : {}),
    });
  }

  #startSnapshot(room: string): void {
    this.#room(room).sinceSnapshot ??= [];
  }

  /** A snapshot of a room's users, with the events that arrived while it was on its way. */
  #applySnapshot(state: RoomState, users: PresentUser[], count: number): void {
    state.roster = new Map(users.map((u) => [u.user_id, u.connections]));
    state.count = count;
    const shown = new Map<string, number>();
    for (const u of users) {
      if (typeof u.version !== "number" || u.version <= 0) continue;
      shown.set(u.user_id, u.version);
      if ((state.versions.get(u.user_id) ?? 0) < u.version) state.versions.set(u.user_id, u.version);
    }
    // Events that arrived while the snapshot was on its way, unless the snapshot is newer.
    for (const event of state.sinceSnapshot ?? []) {
      if (typeof event.version === "number" && event.version <= (shown.get(event.user_id) ?? 0)) continue;
      applyPresence(state, event);
    }
    delete state.sinceSnapshot;
  }

  #room(room: string): RoomState {
    let state = this.#rooms.get(room);
    if (!state) {
      state = { seen: new Set(), seenOrder: [], roster: new Map(), versions: new Map(), joined: false };
      this.#rooms.set(room, state);
    }
    return state;
  }

  #emit<E extends keyof Events>(event: E, ...args: Parameters<Events[E]>): void {
    for (const listener of this.#listeners.get(event) ?? []) {
      try {
        (listener as unknown as (...a: Parameters<Events[E]>) => void)(...args);
      } catch (error) {
        // A listener's failure is the application's; it never stops the client.
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}

function applyPresence(state: RoomState, event: PresenceEvent): void {
  if (event.event === "joined") state.roster.set(event.user_id, Math.max(1, state.roster.get(event.user_id) ?? 0));
  else state.roster.delete(event.user_id);
  if (typeof event.users === "number") state.count = event.users;
}

/** Time order: by timestamp, then id (ids are UUIDv7: time-ordered). */
function compareMessages(a: Pick<ChatMessage, "id" | "timestamp">, b: Pick<ChatMessage, "id" | "timestamp">): number {
  if (a.timestamp && b.timestamp && a.timestamp !== b.timestamp) return a.timestamp < b.timestamp ? -1 : 1;
  return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}

function randomKey(): string {
  const crypto = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

/** The soonest a token is refreshed again after a refresh (a token function that gives one that
 * is about to expire must not make the client refresh back to back). */
const MIN_REFRESH_MS = 1_000;
/** How long a connection's replacement waits for the requests in flight. */
const ROLLOVER_WAIT_MS = 5_000;
/** `setTimeout`'s longest wait (about 24.8 days); a longer one fires at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** A JWT's `exp` (epoch seconds), read without checking it (the server checks); undefined for
 * anything else. */
function tokenExpiry(token: string): number | undefined {
  const payload = token.split(".")[1];
  if (!payload) return undefined;
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(payload.length / 4) * 4, "=");
    const json = JSON.parse(globalThis.atob(base64)) as { exp?: unknown };
    return typeof json.exp === "number" ? json.exp : undefined;
  } catch {
    return undefined;
  }
}

function describe(error: unknown): string {
  if (error instanceof Error) return error.message;
  return String(error);
}
