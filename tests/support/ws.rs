//! The local stack over real WebSockets: `roomcast dev` on a free port, and a client of it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use roomcast::auth::{Claims, mint};
use roomcast::dev::{DevOptions, DevStack};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const SECRET: &[u8] = b"roomcast-test-secret";

/// `roomcast dev` on a free port, on the embedded store or on moto.
pub async fn dev(kind: &str, tweak: impl FnOnce(&mut DevOptions)) -> DevStack {
    super::capture_logs();
    let mut options = DevOptions {
        port: 0,
        auth: roomcast::gateway::AuthMode::Jwt { secret: SECRET.to_vec() },
        // Off, but where a test sets them: other tests send faster than a client may.
        rate_limits: roomcast::limits::RateLimits::unlimited(),
        ..DevOptions::default()
    };
    options.delivery.initial_backoff = Duration::from_millis(20);
    if kind == "dynamodb" {
        options.dynamodb_endpoint = Some(super::moto_endpoint());
        options.table =
            format!("dev-{}-{}", std::process::id(), super::TABLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    }
    tweak(&mut options);
    roomcast::dev::start(options).await.expect("start the dev stack")
}

pub fn presence(user: &str, event: &str) -> impl Fn(&Value) -> bool {
    let (user, event) = (user.to_string(), event.to_string());
    move |f| f["action"] == "presence" && f["user_id"] == user.as_str() && f["event"] == event.as_str()
}

/// `client` asks for every page of `who` in `room`: (user, connections), and the total.
pub async fn who(client: &mut Client, room: &str) -> (Vec<(String, u64)>, u64) {
    let mut users = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = client.ask(serde_json::json!({"action":"who","room":room,"limit":2,"after":after}), "who").await;
        for u in page["users"].as_array().unwrap() {
            users.push((u["user_id"].as_str().unwrap().to_string(), u["connections"].as_u64().unwrap()));
        }
        match &page["next"] {
            Value::String(next) => after = Value::String(next.clone()),
            _ => return (users, page["total"].as_u64().unwrap()),
        }
    }
}

/// Waits until the table's live memberships of acme/`room` are `want` (user, connections),
/// then checks that `who` answers the same.
pub async fn who_settles_on(stack: &DevStack, client: &mut Client, room: &str, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(u, n)| (u.to_string(), *n)).collect();
    for _ in 0..200 {
        let members = stack.store.room_members("acme", room, chrono::Utc::now()).await.unwrap();
        let mut live = std::collections::BTreeMap::<String, u64>::new();
        for m in members {
            *live.entry(m.user_id).or_default() += 1;
        }
        let live: Vec<_> = live.into_iter().collect();
        if live == want {
            // The memberships are settled; presence follows from their records.
            for _ in 0..200 {
                let (users, total) = who(client, room).await;
                if users == want && total == want.len() as u64 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("who never equalled the live set {want:?}: {:?}", who(client, room).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the room's memberships never became {want:?}");
}

/// Takes every pending frame matching `want`.
pub fn take_all(client: &mut Client, want: impl Fn(&Value) -> bool) -> Vec<Value> {
    std::iter::from_fn(|| client.pending_match(&want)).collect()
}

pub fn token(tenant: &str, user: &str) -> String {
    token_for(tenant, user, 3600)
}

/// A token of the dev stack's secret that expires in `ttl_seconds`.
pub fn token_for(tenant: &str, user: &str, ttl_seconds: i64) -> String {
    let exp = chrono::Utc::now().timestamp() + ttl_seconds;
    mint(
        &Claims {
            tenant: tenant.into(),
            sub: user.into(),
            exp,
            nbf: None,
            scope: None,
            rooms: None,
            extra: Default::default(),
        },
        SECRET,
    )
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A real WebSocket client that keeps what it has not looked at yet.
pub struct Client {
    socket: Socket,
    pending: Vec<Value>,
    pub closed: Option<(u16, String)>,
}

/// Connects with a query string (`token=…&rooms=…`); the upgrade's HTTP status on refusal.
pub async fn try_connect(stack: &DevStack, query: &str) -> Result<Client, u16> {
    let url = format!("{}?{query}", stack.ws_url());
    match tokio_tungstenite::connect_async(url).await {
        Ok((socket, _)) => Ok(Client { socket, pending: Vec::new(), closed: None }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("connect failed without an HTTP answer: {e}"),
    }
}

pub async fn connect(stack: &DevStack, tenant: &str, user: &str, rooms: &str) -> Client {
    let query = format!("token={}&rooms={rooms}", token(tenant, user));
    try_connect(stack, &query).await.unwrap_or_else(|status| panic!("connect refused with {status}"))
}

impl Client {
    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    /// Sends, reporting whether the socket took it (false once the server has closed it).
    pub async fn try_send(&mut self, frame: Value) -> bool {
        self.socket.send(Message::Text(frame.to_string().into())).await.is_ok()
    }

    pub async fn send_text(&mut self, text: String) {
        self.socket.send(Message::Text(text.into())).await.expect("send a frame");
    }

    async fn read(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.socket.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).expect("JSON frames")),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    self.closed =
                        Some(frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string())));
                    return None;
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => {
                    self.closed.get_or_insert((1006, String::new()));
                    return None;
                }
            }
        }
    }

    /// The first frame (pending or new) matching `want`, within 10 s; panics otherwise.
    pub async fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&want) {
            return self.pending.remove(i);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
            match self.read(left).await {
                Some(frame) if want(&frame) => return frame,
                Some(frame) => self.pending.push(frame),
                None if self.closed.is_some() => {
                    panic!("closed {:?} while waiting for {what}; had {:?}", self.closed, self.pending)
                }
                None => break,
            }
        }
        panic!("no {what} within 10 s; had {:?}", self.pending)
    }

    pub async fn expect_action(&mut self, action: &str) -> Value {
        self.expect(action, |f| f["action"] == action).await
    }

    /// Waits for the marker frame `marker` and asserts that nothing matching `unwanted`
    /// arrived before it: the negative check of a frame that, had it been sent, would have
    /// been sent before the marker.
    pub async fn expect_before(
        &mut self,
        what: &str,
        marker: impl Fn(&Value) -> bool,
        unwanted: impl Fn(&Value) -> bool,
    ) {
        self.expect(what, marker).await;
        assert!(!self.pending.iter().any(unwanted), "unexpected before {what}: {:?}", self.pending);
    }

    /// Takes a pending frame matching `want`, if one has arrived.
    pub fn pending_match(&mut self, want: impl Fn(&Value) -> bool) -> Option<Value> {
        let i = self.pending.iter().position(want)?;
        Some(self.pending.remove(i))
    }

    /// A request/answer on this socket (route responses come back on it).
    pub async fn ask(&mut self, frame: Value, answer: &str) -> Value {
        self.send(frame).await;
        self.expect_action(answer).await
    }

    /// Waits for the server to close the socket; the close code and reason.
    pub async fn expect_close(&mut self, wait: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + wait;
        while self.closed.is_none() {
            let left = deadline.checked_duration_since(tokio::time::Instant::now()).expect("closed in time");
            if let Some(frame) = self.read(left).await {
                self.pending.push(frame);
            }
        }
        self.closed.clone().unwrap()
    }

    pub async fn close(mut self) {
        let frame =
            tokio_tungstenite::tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
        let _ = self.socket.close(Some(frame)).await;
        // Read until the server's close arrives, so `$disconnect` has been called.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), self.socket.next()).await {}
    }
}
