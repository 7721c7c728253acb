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
    onmessage: ((event: {
        data: unknown;
    }) => void) | null;
    onclose: ((event: {
        code: number;
        reason: string;
    }) => void) | null;
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
export declare class RoomcastError extends Error {
    readonly code: string;
    constructor(code: string, message: string);
}
/** The server refused a message after accepting it (a tenant's rules). */
export declare class RejectedError extends RoomcastError {
    readonly id: string;
    readonly reason: string;
    constructor(id: string, reason: string);
}
/** A join the tenant's rules, or the token's `rooms` claim, refused. */
export declare class JoinDeniedError extends RoomcastError {
    readonly room: string;
    readonly reason: string;
    constructor(room: string, reason: string);
}
/** The connection was refused at its upgrade (401/403: a bad or expired token). Not retried. */
export declare class AuthError extends RoomcastError {
    constructor(message: string);
}
/** Too many sends are waiting for the connection to come back. */
export declare class QueueFullError extends RoomcastError {
    constructor(limit: number);
}
/** Over a rate limit, after `maxRateLimitRetries` waits of `retryAfterMs` each. */
export declare class RateLimitedError extends RoomcastError {
    /** When the server said to try again, in milliseconds. */
    readonly retryAfterMs: number;
    constructor(message: string, 
    /** When the server said to try again, in milliseconds. */
    retryAfterMs: number);
}
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
    signal: (signal: {
        id: string;
        room: string;
        user_id: string;
        data: unknown;
    }) => void;
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
/** Opens a client; it connects at once and keeps the connection until `close()`. */
export declare function connect(options: ConnectOptions): RoomcastClient;
export declare class RoomcastClient {
    #private;
    constructor(options: ConnectOptions);
    /** `connecting`, `open`, `reconnecting` or `closed`. */
    get state(): State;
    /** This connection's id (API Gateway's), once open. */
    get connectionId(): string | undefined;
    /** The user the token identified, once open. */
    get userId(): string | undefined;
    /** Subscribes to an event; returns the function that unsubscribes. */
    on<E extends keyof Events>(event: E, listener: Events[E]): () => void;
    /** Resolves when the connection is open (now, or after the next reconnect). */
    ready(): Promise<void>;
    /** Repeats dropped so far: messages and presence events seen before (a redelivered batch, a
     * recovery's overlap). */
    get duplicatesDropped(): number;
    /** Tokens refreshed in place so far (`refresh`), and connections replaced before the
     * maximum connection duration. */
    get tokensRefreshed(): number;
    get connectionsReplaced(): number;
    /** Presence events dropped as older than one already applied for the same user (frames from
     * two shards that arrived the other way round). */
    get stalePresenceDropped(): number;
    /** Users present in a room, as the server last counted them (the roster may hold only the
     * first page of a large room). */
    count(room: string): number;
    /** The rooms this client is in (joined, and not waiting for a decision). */
    get rooms(): string[];
    /** The users present in a room, as this client knows them (from the join and presence). */
    roster(room: string): PresentUser[];
    /** Joins a room: resolves with its users, or rejects with `JoinDeniedError`. */
    join(room: string): Promise<JoinAck>;
    /** Leaves a room; its roster is dropped. */
    leave(room: string): Promise<void>;
    /**
     * Sends a message; resolves with its id once written. While reconnecting, it waits in a
     * bounded queue. An idempotency key (made up when not given) makes a resend after a
     * reconnect write the message once.
     */
    send(room: string, message: string, options?: {
        idempotencyKey?: string;
    }): Promise<{
        id: string;
    }>;
    /** A page of history: the newest, or before / after a cursor (a message id or a page's `next`). */
    history(room: string, options?: {
        limit?: number;
        before?: string;
        after?: string;
    }): Promise<HistoryPage>;
    /** Who is in a room now, from the server (every page); the roster is refreshed with it. */
    who(room: string): Promise<PresentUser[]>;
    /** An ephemeral event (typing, a cursor) for the room's other members. */
    signal(room: string, data: unknown): Promise<void>;
    /** Stops: no reconnect; waiting requests and sends reject. */
    close(): void;
    /** Requests refused as rate limited and sent again (or given up on). */
    get rateLimited(): number;
}
