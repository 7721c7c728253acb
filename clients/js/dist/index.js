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
/** Every error this client gives. `code` is the server's (`not_member`, …) or the client's. */
export class RoomcastError extends Error {
    code;
    constructor(code, message) {
        super(message);
        this.code = code;
        this.name = "RoomcastError";
    }
}
/** The server refused a message after accepting it (a tenant's rules). */
export class RejectedError extends RoomcastError {
    id;
    reason;
    constructor(id, reason) {
        super("rejected", reason);
        this.id = id;
        this.reason = reason;
        this.name = "RejectedError";
    }
}
/** A join the tenant's rules, or the token's `rooms` claim, refused. */
export class JoinDeniedError extends RoomcastError {
    room;
    reason;
    constructor(room, reason) {
        super("join_denied", reason);
        this.room = room;
        this.reason = reason;
        this.name = "JoinDeniedError";
    }
}
/** The connection was refused at its upgrade (401/403: a bad or expired token). Not retried. */
export class AuthError extends RoomcastError {
    constructor(message) {
        super("unauthorized", message);
        this.name = "AuthError";
    }
}
/** Too many sends are waiting for the connection to come back. */
export class QueueFullError extends RoomcastError {
    constructor(limit) {
        super("queue_full", `${limit} sends are already waiting for the connection to come back`);
        this.name = "QueueFullError";
    }
}
/** Over a rate limit, after `maxRateLimitRetries` waits of `retryAfterMs` each. */
export class RateLimitedError extends RoomcastError {
    retryAfterMs;
    constructor(message, 
    /** When the server said to try again, in milliseconds. */
    retryAfterMs) {
        super("rate_limited", message);
        this.retryAfterMs = retryAfterMs;
        this.name = "RateLimitedError";
    }
}
/** Requests the server does not rate-limit (a connection can always leave). */
const UNLIMITED = new Set(["leave"]);
const isLimited = (frame) => !UNLIMITED.has(String(frame.action));
/** Rate-limited requests on the wire at once: a burst (a queue flushed after a reconnect,
 * `Promise.all` of many sends) goes out as answers come back, so that it never reaches the
 * three times its limit in a second at which the server closes a connection. */
const MAX_LIMITED_IN_FLIGHT = 8;
const OPEN = 1;
/** Opens a client; it connects at once and keeps the connection until `close()`. */
export function connect(options) {
    return new RoomcastClient(options);
}
export class RoomcastClient {
    #options;
    #WebSocket;
    #socket;
    #state = "connecting";
    #listeners = new Map();
    #pending = new Map();
    #queue = [];
    #rooms = new Map();
    #joinWaiters = new Map();
    #nextRef = 0;
    #attempt = 0;
    #pingTimer;
    #retryTimer;
    #readyWaiters = [];
    #stopped = false;
    #connectionId;
    #userId;
    #duplicates = 0;
    /** Ids of the user messages already emitted (the last `dedupeWindow`), oldest first. */
    #userMessages = new Set();
    #userMessageOrder = [];
    #stale = 0;
    #reconnecting = false;
    #failedAttempts = 0;
    #recoverTimer;
    /** Until when (epoch ms) rate-limited requests wait: the server said so. */
    #holdUntil = 0;
    #rateLimited = 0;
    /** Limited requests waiting for the hold to end or for room on the wire, in order. */
    #paced = [];
    #limitedInFlight = 0;
    #pacer;
    /** The token this connection holds, as last sent (at connect or by `refresh`). */
    #token;
    #refreshTimer;
    #rolloverTimer;
    #refreshes = 0;
    #rollovers = 0;
    /** The refresh under way, if any: one at a time. */
    #refreshing;
    constructor(options) {
        const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
        if (!WebSocketImpl) {
            throw new RoomcastError("no_websocket", "no WebSocket implementation: pass one (connect({ …, WebSocket })), e.g. the `ws` package's on Node 20");
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
    get state() {
        return this.#state;
    }
    /** This connection's id (API Gateway's), once open. */
    get connectionId() {
        return this.#connectionId;
    }
    /** The user the token identified, once open. */
    get userId() {
        return this.#userId;
    }
    /** Subscribes to an event; returns the function that unsubscribes. */
    on(event, listener) {
        let set = this.#listeners.get(event);
        if (!set) {
            set = new Set();
            this.#listeners.set(event, set);
        }
        set.add(listener);
        return () => set.delete(listener);
    }
    /** Resolves when the connection is open (now, or after the next reconnect). */
    ready() {
        if (this.#state === "open")
            return Promise.resolve();
        if (this.#state === "closed")
            return Promise.reject(new RoomcastError("closed", "the client is closed"));
        return new Promise((resolve, reject) => this.#readyWaiters.push({ resolve, reject }));
    }
    /** Repeats dropped so far: messages and presence events seen before (a redelivered batch, a
     * recovery's overlap). */
    get duplicatesDropped() {
        return this.#duplicates;
    }
    /** Tokens refreshed in place so far (`refresh`), and connections replaced before the
     * maximum connection duration. */
    get tokensRefreshed() {
        return this.#refreshes;
    }
    get connectionsReplaced() {
        return this.#rollovers;
    }
    /** Presence events dropped as older than one already applied for the same user (frames from
     * two shards that arrived the other way round). */
    get stalePresenceDropped() {
        return this.#stale;
    }
    /** Users present in a room, as the server last counted them (the roster may hold only the
     * first page of a large room). */
    count(room) {
        const state = this.#rooms.get(room);
        if (!state)
            return 0;
        return Math.max(state.count ?? 0, state.roster.size);
    }
    /** The rooms this client is in (joined, and not waiting for a decision). */
    get rooms() {
        return [...this.#rooms.entries()].filter(([, s]) => s.joined).map(([room]) => room).sort();
    }
    /** The users present in a room, as this client knows them (from the join and presence). */
    roster(room) {
        const state = this.#rooms.get(room);
        if (!state)
            return [];
        return [...state.roster.entries()]
            .map(([user_id, connections]) => ({ user_id, connections }))
            .sort((a, b) => a.user_id.localeCompare(b.user_id));
    }
    /** Joins a room: resolves with its users, or rejects with `JoinDeniedError`. */
    async join(room) {
        const state = this.#room(room);
        const wasJoined = state.joined;
        state.joined = true;
        this.#startSnapshot(room);
        const waited = new Promise((resolve, reject) => {
            const list = this.#joinWaiters.get(room) ?? [];
            list.push({ resolve, reject });
            this.#joinWaiters.set(room, list);
        });
        // When the request itself fails, that failure is what this call rejects with.
        waited.catch(() => undefined);
        // The answer may be the ack itself, or `pending` and later the ack or `join_denied`
        // from the server once the tenant's rules decided.
        const answer = await this.#request({ action: "join", room }).catch((error) => {
            // Refused: the room is not rejoined on the next reconnect.
            if (!wasJoined && this.#rooms.get(room) === state)
                state.joined = false;
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
        if (answer.action === "ack" && !answer.pending)
            this.#onJoinAck(answer);
        return waited;
    }
    /** Leaves a room; its roster is dropped. */
    async leave(room) {
        const state = this.#rooms.get(room);
        if (state)
            state.joined = false;
        await this.#request({ action: "leave", room });
        this.#rooms.delete(room);
    }
    /**
     * Sends a message; resolves with its id once written. While reconnecting, it waits in a
     * bounded queue. An idempotency key (made up when not given) makes a resend after a
     * reconnect write the message once.
     */
    async send(room, message, options = {}) {
        const key = options.idempotencyKey ?? randomKey();
        const answer = await this.#request({ action: "sendMessage", room, message, idempotency_key: key }, true);
        return { id: String(answer.id) };
    }
    /** A page of history: the newest, or before / after a cursor (a message id or a page's `next`). */
    async history(room, options = {}) {
        const frame = { action: "history", room };
        if (options.limit !== undefined)
            frame.limit = options.limit;
        if (options.before !== undefined)
            frame.before = options.before;
        if (options.after !== undefined)
            frame.after = options.after;
        const answer = await this.#request(frame);
        return {
            room,
            messages: answer.messages ?? [],
            ...(answer.next ? { next: String(answer.next) } : {}),
        };
    }
    /** Who is in a room now, from the server (every page); the roster is refreshed with it. */
    async who(room) {
        const users = [];
        let after;
        this.#startSnapshot(room);
        for (;;) {
            const answer = await this.#request({ action: "who", room, ...(after ? { after } : {}) });
            users.push(...(answer.users ?? []));
            if (!answer.next)
                break;
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
    async signal(room, data) {
        await this.#request({ action: "signal", room, data });
    }
    /** Stops: no reconnect; waiting requests and sends reject. */
    close() {
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
            }
            catch {
                // already closing
            }
        }
        this.#fail(new RoomcastError("closed", "the client was closed"));
        this.#setState("closed");
    }
    // --- the connection -----------------------------------------------------------------------
    async #open() {
        let token;
        try {
            const source = this.#options.token;
            token = typeof source === "function" ? await source() : source;
        }
        catch (error) {
            this.#emit("error", new RoomcastError("token", `the token function failed: ${describe(error)}`));
            this.#scheduleReconnect();
            return;
        }
        if (this.#stopped)
            return;
        this.#token = token;
        const query = new URLSearchParams({ token });
        const rooms = [...this.#rooms.entries()].filter(([, s]) => s.joined).map(([room]) => room);
        if (rooms.length)
            query.set("rooms", rooms.join(","));
        const since = [...this.#rooms.entries()]
            .filter(([, s]) => s.joined && s.lastId)
            .map(([room, s]) => `${room}:${s.lastId}`);
        if (since.length)
            query.set("since", since.join(","));
        // Rooms recovering hold their live messages until their `recover` frame.
        this.#reconnecting = Boolean(this.#connectionId);
        for (const state of this.#rooms.values()) {
            if (state.joined && state.lastId)
                state.held = [];
            else
                delete state.held;
        }
        const separator = this.#options.url.includes("?") ? "&" : "?";
        let socket;
        try {
            socket = new this.#WebSocket(`${this.#options.url}${separator}${query}`);
        }
        catch (error) {
            this.#emit("error", new RoomcastError("connect", describe(error)));
            this.#scheduleReconnect();
            return;
        }
        this.#socket = socket;
        let opened = false;
        let refusal;
        socket.onopen = () => {
            opened = true;
        };
        socket.onerror = (event) => {
            // `ws` says why an upgrade failed ("Unexpected server response: 401"); browsers do not.
            const text = describe(event?.error ?? event?.message ?? "");
            if (/\b(401|403)\b/.test(text))
                refusal = text;
        };
        socket.onmessage = (event) => this.#onFrame(String(event.data));
        socket.onclose = (event) => {
            if (this.#socket !== socket)
                return;
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
            const offline = globalThis.navigator?.onLine === false;
            if (!opened && !offline)
                this.#failedAttempts += 1;
            if (this.#failedAttempts >= this.#options.maxFailedAttempts) {
                const error = new RoomcastError("unreachable", `${this.#failedAttempts} connection attempts in a row never opened (a refused token, or the server unreachable)`);
                this.#stopped = true;
                this.#emit("error", error);
                this.#fail(error);
                this.#setState("closed");
                return;
            }
            this.#scheduleReconnect();
        };
    }
    #scheduleReconnect() {
        if (this.#stopped)
            return;
        this.#setState(this.#connectionId ? "reconnecting" : "connecting");
        const base = Math.min(this.#options.maxBackoffMs, this.#options.initialBackoffMs * 2 ** this.#attempt);
        this.#attempt += 1;
        // Full jitter: many clients dropped together do not come back together.
        const delay = Math.round(base / 2 + Math.random() * (base / 2));
        this.#retryTimer = setTimeout(() => void this.#open(), delay);
    }
    #setState(state) {
        if (this.#state === state)
            return;
        this.#state = state;
        this.#emit("state", state);
        if (state === "open") {
            for (const waiter of this.#readyWaiters.splice(0))
                waiter.resolve();
        }
    }
    #startPing() {
        this.#stopPing();
        this.#pingTimer = setInterval(() => {
            this.#request({ action: "ping" }).catch((error) => {
                // No answer: the connection is dead though it looks open (a sleep, a network change).
                if (error.code === "timeout")
                    this.#socket?.close(4000, "ping timeout");
            });
        }, this.#options.pingIntervalMs);
        this.#pingTimer.unref?.();
    }
    #stopPing() {
        clearInterval(this.#pingTimer);
        this.#pingTimer = undefined;
    }
    #stopTimers() {
        clearTimeout(this.#refreshTimer);
        clearTimeout(this.#rolloverTimer);
        this.#refreshTimer = undefined;
        this.#rolloverTimer = undefined;
    }
    /** Refreshes the token `refreshBeforeMs` before its `exp` (with a token function only), at
     * least `MIN_REFRESH_MS` from now; not at all when the connection is replaced first. */
    #scheduleRefresh() {
        clearTimeout(this.#refreshTimer);
        const exp = this.#token ? tokenExpiry(this.#token) : undefined;
        if (exp === undefined || typeof this.#options.token !== "function")
            return;
        const wait = Math.max(MIN_REFRESH_MS, exp * 1000 - Date.now() - this.#options.refreshBeforeMs);
        if (wait >= this.#options.maxConnectionMs)
            return;
        this.#refreshTimer = setTimeout(() => void this.#refresh(), wait);
        this.#refreshTimer.unref?.();
    }
    /** A new token from the token function, sent with `refresh`; a refusal is an `error` event.
     * One at a time: a second call while one is under way joins it. */
    #refresh() {
        this.#refreshing ??= this.#refreshOnce().finally(() => (this.#refreshing = undefined));
        return this.#refreshing;
    }
    async #refreshOnce() {
        const source = this.#options.token;
        if (typeof source !== "function" || this.#state !== "open")
            return;
        let token;
        try {
            token = await source();
        }
        catch (error) {
            this.#emit("error", new RoomcastError("token", `the token function failed: ${describe(error)}`));
            return;
        }
        try {
            await this.#request({ action: "refresh", token });
            this.#token = token;
            this.#refreshes++;
        }
        catch (error) {
            this.#emit("error", error);
        }
        // Again before the new token expires (a token no later than the last: after the minimum).
        this.#scheduleRefresh();
    }
    /** Replaces the connection before API Gateway's two-hour limit: closed here, reopened at once
     * with a fresh token, its rooms recovered with `since`. */
    #scheduleRollover() {
        clearTimeout(this.#rolloverTimer);
        const replace = (waited) => {
            const socket = this.#socket;
            if (!socket || this.#stopped)
                return;
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
        this.#rolloverTimer.unref?.();
    }
    // --- requests -----------------------------------------------------------------------------
    #request(frame, queueable = false) {
        if (this.#stopped)
            return Promise.reject(new RoomcastError("closed", "the client is closed"));
        return new Promise((resolve, reject) => {
            if (this.#socket?.readyState === OPEN && this.#state === "open") {
                this.#transmit(frame, resolve, reject);
            }
            else if (queueable) {
                if (this.#queue.length >= this.#options.maxQueuedSends) {
                    reject(new QueueFullError(this.#options.maxQueuedSends));
                    return;
                }
                this.#queue.push({ frame, resolve, reject });
            }
            else {
                reject(new RoomcastError("not_connected", `not connected (${this.#state}): ${String(frame.action)} needs an open connection`));
            }
        });
    }
    #transmit(frame, resolve, reject, limited = 0) {
        if (isLimited(frame)) {
            // The server said when (a request sent before then would only be refused again), or the
            // wire has its share of limited requests: wait, in order (a retry first).
            if (this.#paced.length > 0 || Date.now() < this.#holdUntil || this.#limitedInFlight >= MAX_LIMITED_IN_FLIGHT) {
                const waiting = { frame, resolve, reject, limited };
                if (limited > 0)
                    this.#paced.unshift(waiting);
                else
                    this.#paced.push(waiting);
                this.#pace();
                return;
            }
            this.#limitedInFlight++;
        }
        this.#onTheWire(frame, resolve, reject, limited);
    }
    /** Puts one request on the wire under a fresh `ref`, rejected if no answer comes in time. */
    #onTheWire(frame, resolve, reject, limited) {
        const ref = `r${++this.#nextRef}`;
        const timer = setTimeout(() => {
            this.#settled(ref);
            reject(new RoomcastError("timeout", `no answer to ${String(frame.action)} within ${this.#options.requestTimeoutMs} ms`));
        }, this.#options.requestTimeoutMs);
        this.#pending.set(ref, { resolve, reject, timer, frame, limited });
        this.#socket.send(JSON.stringify({ ...frame, ref }));
    }
    /** A request no longer on the wire: its place goes to the next limited one waiting. */
    #settled(ref) {
        const pending = this.#pending.get(ref);
        if (!pending)
            return undefined;
        this.#pending.delete(ref);
        clearTimeout(pending.timer);
        if (isLimited(pending.frame)) {
            this.#limitedInFlight = Math.max(0, this.#limitedInFlight - 1);
            this.#pace();
        }
        return pending;
    }
    /** Sends what waits, as far as the hold and the wire allow; wakes up when the hold ends. */
    #pace() {
        if (this.#pacer)
            return;
        const wait = this.#holdUntil - Date.now();
        if (wait > 0) {
            this.#pacer = setTimeout(() => {
                this.#pacer = undefined;
                this.#pace();
            }, wait);
            this.#pacer.unref?.();
            return;
        }
        while (this.#paced.length > 0 && this.#limitedInFlight < MAX_LIMITED_IN_FLIGHT && Date.now() >= this.#holdUntil) {
            const next = this.#paced.shift();
            if (this.#socket?.readyState === OPEN && this.#state === "open") {
                this.#limitedInFlight++;
                this.#onTheWire(next.frame, next.resolve, next.reject, next.limited);
            }
            else {
                this.#resend(next.frame, next.resolve, next.reject, next.limited);
            }
        }
    }
    /** A request held or refused as rate limited, sent again: now if open, else queued (sends)
     * or failed like any request made while not connected. */
    #resend(frame, resolve, reject, limited) {
        if (this.#stopped) {
            reject(new RoomcastError("closed", "the client is closed"));
        }
        else if (this.#socket?.readyState === OPEN && this.#state === "open") {
            this.#transmit(frame, resolve, reject, limited);
        }
        else if (frame.action === "sendMessage" && this.#queue.length < this.#options.maxQueuedSends) {
            this.#queue.push({ frame, resolve, reject });
        }
        else {
            reject(new RoomcastError("not_connected", `not connected (${this.#state}): ${String(frame.action)} needs an open connection`));
        }
    }
    /** Requests refused as rate limited and sent again (or given up on). */
    get rateLimited() {
        return this.#rateLimited;
    }
    /** The socket closed: sends in flight go back to the queue (their idempotency key makes the
     * resend safe); other requests fail. */
    #rejectInFlight(code) {
        const requeued = [];
        for (const [ref, pending] of this.#pending) {
            clearTimeout(pending.timer);
            this.#pending.delete(ref);
            if (pending.frame.action === "sendMessage" && this.#queue.length + requeued.length < this.#options.maxQueuedSends) {
                requeued.push({ frame: pending.frame, resolve: pending.resolve, reject: pending.reject });
            }
            else {
                pending.reject(new RoomcastError("disconnected", `the connection closed (${code}) before the answer`));
            }
        }
        // Limited requests still waiting to go: sends wait for the reconnect with the rest.
        for (const waiting of this.#paced.splice(0)) {
            if (waiting.frame.action === "sendMessage" && this.#queue.length + requeued.length < this.#options.maxQueuedSends) {
                requeued.push({ frame: waiting.frame, resolve: waiting.resolve, reject: waiting.reject });
            }
            else {
                waiting.reject(new RoomcastError("disconnected", `the connection closed (${code}) before it was sent`));
            }
        }
        this.#limitedInFlight = 0;
        // In the order they were sent, before anything queued since.
        this.#queue.unshift(...requeued);
    }
    #fail(error) {
        for (const pending of this.#pending.values()) {
            clearTimeout(pending.timer);
            pending.reject(error);
        }
        this.#pending.clear();
        this.#limitedInFlight = 0;
        if (this.#pacer)
            clearTimeout(this.#pacer);
        this.#pacer = undefined;
        for (const waiting of this.#paced.splice(0))
            waiting.reject(error);
        for (const queued of this.#queue.splice(0))
            queued.reject(error);
        for (const waiter of this.#readyWaiters.splice(0))
            waiter.reject(error);
        for (const [room] of this.#joinWaiters)
            this.#settleJoin(room, error);
    }
    // --- frames -------------------------------------------------------------------------------
    #onFrame(text) {
        let frame;
        try {
            frame = JSON.parse(text);
        }
        catch {
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
            const pending = this.#settled(ref);
            if (frame.action === "error" && frame.code === "rate_limited" && isLimited(pending.frame)) {
                this.#rateLimited++;
                const after = typeof frame.retry_after_ms === "number" ? frame.retry_after_ms : 1000;
                if (pending.limited >= this.#options.maxRateLimitRetries) {
                    pending.reject(new RateLimitedError(String(frame.message), after));
                }
                else {
                    // Every limited request waits with it (the hold above, with a little jitter).
                    this.#transmit(pending.frame, pending.resolve, pending.reject, pending.limited + 1);
                }
            }
            else if (frame.action === "error") {
                // The token ran out before a refresh could replace it: refresh now.
                if (frame.code === "token_expired")
                    void this.#refresh();
                pending.reject(new RoomcastError(String(frame.code), String(frame.message)));
            }
            else if (frame.action === "join_denied") {
                const denied = new JoinDeniedError(String(frame.room), String(frame.reason));
                pending.reject(denied);
                this.#onJoinDenied(denied);
            }
            else {
                pending.resolve(frame);
            }
            return;
        }
        switch (frame.action) {
            case "welcome":
                this.#onWelcome(frame);
                break;
            case "message":
                this.#onMessage(frame);
                break;
            case "recover":
                this.#onRecover(frame);
                break;
            case "presence":
                this.#onPresence(frame);
                break;
            case "ack":
                // A join the tenant's rules allowed, after a `pending` answer or at connect.
                if (frame.request === "join" && !frame.pending)
                    this.#onJoinAck(frame);
                // The tenant's backend took this connection out of the room (`leave_user`): forget it,
                // so a reconnect does not rejoin it.
                else if (frame.request === "leave")
                    this.#onServerLeave(String(frame.room));
                break;
            case "join_denied":
                this.#onJoinDenied(new JoinDeniedError(String(frame.room), String(frame.reason)));
                break;
            case "rejected":
                this.#emit("rejected", new RejectedError(String(frame.id), String(frame.reason)));
                break;
            case "signal":
                this.#emit("signal", frame);
                break;
            case "user_message":
                this.#onUserMessage(frame);
                break;
            case "error":
                // The service disconnected this user: reconnecting would only be refused (or undo it).
                if (frame.code === "terminated")
                    this.#stopped = true;
                this.#emit("error", new RoomcastError(String(frame.code), String(frame.message)));
                break;
            default:
                break;
        }
    }
    #onWelcome(frame) {
        this.#connectionId = String(frame.connection_id);
        this.#userId = String(frame.user_id);
        this.#attempt = 0;
        this.#failedAttempts = 0;
        for (const room of frame.rooms ?? [])
            this.#room(room).joined = true;
        this.#setState("open");
        this.#emit("welcome", frame);
        this.#startPing();
        this.#scheduleRefresh();
        this.#scheduleRollover();
        // Rosters start from the server's view of each room the welcome names.
        for (const room of frame.rooms ?? []) {
            this.who(room).catch((error) => this.#emit("error", error));
        }
        // Sends to a room still waiting for the tenant's rules wait for its ack.
        const welcomed = new Set(frame.rooms ?? []);
        const waiting = this.#queue.filter((q) => this.#rooms.get(String(q.frame.room))?.joined && !welcomed.has(String(q.frame.room)));
        for (const queued of this.#queue.splice(0)) {
            if (waiting.includes(queued))
                this.#queue.push(queued);
            else
                this.#transmit(queued.frame, queued.resolve, queued.reject);
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
                if (state.held && welcomed.has(room))
                    this.#onRecover({ room, recovered: false, reason: "no recovery answer came" });
            }
        }, this.#options.requestTimeoutMs);
        this.#recoverTimer.unref?.();
    }
    /** Sends that waited for a room's decision: its ack came. */
    #flushRoom(room) {
        if (this.#state !== "open")
            return;
        const ready = this.#queue.filter((q) => String(q.frame.room) === room);
        this.#queue = this.#queue.filter((q) => String(q.frame.room) !== room);
        for (const queued of ready)
            this.#transmit(queued.frame, queued.resolve, queued.reject);
    }
    #onServerLeave(room) {
        if (!this.#rooms.delete(room))
            return;
        this.#emit("left", room);
        this.#emit("roster", room);
    }
    #onJoinAck(frame) {
        const room = String(frame.room);
        const state = this.#room(room);
        const members = frame.members ?? [];
        state.joined = true;
        this.#applySnapshot(state, members, Number(frame.users ?? members.length));
        this.#emit("roster", room);
        const ack = { room, users: Number(frame.users ?? members.length), members };
        for (const waiter of this.#joinWaiters.get(room) ?? [])
            waiter.resolve(ack);
        this.#joinWaiters.delete(room);
        this.#flushRoom(room);
    }
    #onJoinDenied(error) {
        const state = this.#rooms.get(error.room);
        if (state)
            state.joined = false;
        this.#rooms.delete(error.room);
        this.#emit("join_denied", error);
        this.#settleJoin(error.room, error);
        const refused = this.#queue.filter((q) => String(q.frame.room) === error.room);
        this.#queue = this.#queue.filter((q) => String(q.frame.room) !== error.room);
        for (const queued of refused)
            queued.reject(error);
    }
    #settleJoin(room, error) {
        for (const waiter of this.#joinWaiters.get(room) ?? [])
            waiter.reject(error);
        this.#joinWaiters.delete(room);
    }
    #onMessage(message) {
        // A room this client left (or never joined): nothing of it is delivered.
        const state = this.#rooms.get(message.room);
        if (!state)
            return;
        if (state.held) {
            state.held.push(message);
            return;
        }
        this.#deliver(state, message);
    }
    #onUserMessage(message) {
        if (this.#userMessages.has(message.id)) {
            this.#duplicates += 1;
            return;
        }
        this.#userMessages.add(message.id);
        this.#userMessageOrder.push(message.id);
        while (this.#userMessageOrder.length > this.#options.dedupeWindow) {
            this.#userMessages.delete(this.#userMessageOrder.shift());
        }
        this.#emit("userMessage", message);
    }
    #deliver(state, message) {
        if (state.seen.has(message.id)) {
            this.#duplicates += 1;
            return;
        }
        state.seen.add(message.id);
        state.seenOrder.push(message.id);
        while (state.seenOrder.length > this.#options.dedupeWindow) {
            state.seen.delete(state.seenOrder.shift());
        }
        if (!state.lastId || compareMessages(message, { id: state.lastId, timestamp: "" }) > 0) {
            state.lastId = message.id;
        }
        this.#emit("message", message);
    }
    #onRecover(frame) {
        const room = String(frame.room);
        const state = this.#room(room);
        const recovered = Boolean(frame.recovered);
        const held = state.held ?? [];
        delete state.held;
        // What was missed, then what arrived live meanwhile: in order, each once.
        const messages = [...(frame.messages ?? []), ...held].sort(compareMessages);
        for (const message of messages)
            this.#deliver(state, message);
        this.#emit("recovered", { room, recovered, ...(frame.reason ? { reason: String(frame.reason) } : {}) });
    }
    #onPresence(frame) {
        const event = frame;
        const state = this.#rooms.get(event.room);
        if (!state)
            return;
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
    #startSnapshot(room) {
        this.#room(room).sinceSnapshot ??= [];
    }
    /** A snapshot of a room's users, with the events that arrived while it was on its way. */
    #applySnapshot(state, users, count) {
        state.roster = new Map(users.map((u) => [u.user_id, u.connections]));
        state.count = count;
        const shown = new Map();
        for (const u of users) {
            if (typeof u.version !== "number" || u.version <= 0)
                continue;
            shown.set(u.user_id, u.version);
            if ((state.versions.get(u.user_id) ?? 0) < u.version)
                state.versions.set(u.user_id, u.version);
        }
        // Events that arrived while the snapshot was on its way, unless the snapshot is newer.
        for (const event of state.sinceSnapshot ?? []) {
            if (typeof event.version === "number" && event.version <= (shown.get(event.user_id) ?? 0))
                continue;
            applyPresence(state, event);
        }
        delete state.sinceSnapshot;
    }
    #room(room) {
        let state = this.#rooms.get(room);
        if (!state) {
            state = { seen: new Set(), seenOrder: [], roster: new Map(), versions: new Map(), joined: false };
            this.#rooms.set(room, state);
        }
        return state;
    }
    #emit(event, ...args) {
        for (const listener of this.#listeners.get(event) ?? []) {
            try {
                listener(...args);
            }
            catch (error) {
                // A listener's failure is the application's; it never stops the client.
                queueMicrotask(() => {
                    throw error;
                });
            }
        }
    }
}
function applyPresence(state, event) {
    if (event.event === "joined")
        state.roster.set(event.user_id, Math.max(1, state.roster.get(event.user_id) ?? 0));
    else
        state.roster.delete(event.user_id);
    if (typeof event.users === "number")
        state.count = event.users;
}
/** Time order: by timestamp, then id (ids are UUIDv7: time-ordered). */
function compareMessages(a, b) {
    if (a.timestamp && b.timestamp && a.timestamp !== b.timestamp)
        return a.timestamp < b.timestamp ? -1 : 1;
    return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
}
function randomKey() {
    const crypto = globalThis.crypto;
    if (crypto?.randomUUID)
        return crypto.randomUUID();
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
function tokenExpiry(token) {
    const payload = token.split(".")[1];
    if (!payload)
        return undefined;
    try {
        const base64 = payload.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(payload.length / 4) * 4, "=");
        const json = JSON.parse(globalThis.atob(base64));
        return typeof json.exp === "number" ? json.exp : undefined;
    }
    catch {
        return undefined;
    }
}
function describe(error) {
    if (error instanceof Error)
        return error.message;
    return String(error);
}
