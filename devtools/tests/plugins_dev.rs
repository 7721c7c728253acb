//! Plugins 0.2 end to end, as a user runs them: `roomcast dev` as its own process, the
//! `roomcast plugin` commands against it (`--dev`), and real WebSocket clients. Room
//! authorization with the rooms-acl example, a configuration change without a re-upload, a
//! token's `rooms` claim without a plugin, and the plugin's log lines in the dev stack's output.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn wasm(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let path = target.join(format!("wasm32-wasip2/release/{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/test (it builds the components)", path.display());
    path
}

/// `roomcast dev` on a free port; killed when dropped.
struct Dev {
    child: Child,
    base: String,
    ws: String,
    log: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Dev {
    fn start() -> Dev {
        let log = std::env::temp_dir().join(format!("roomcast-dev-{}.log", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["dev", "--port", "0"])
            .env_remove("DYNAMODB_ENDPOINT_URL")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start roomcast dev");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut base, mut ws) = (None, None);
        while base.is_none() || ws.is_none() {
            let line = lines.next().expect("roomcast dev printed its addresses").unwrap();
            let word = |prefix: &str| line.split_whitespace().find(|w| w.starts_with(prefix)).map(str::to_string);
            if line.trim_start().starts_with("websocket") {
                ws = word("ws://").map(|w| w.split('?').next().unwrap().to_string());
            }
            if line.trim_start().starts_with("@connections") {
                base = word("http://").map(|w| w.split("/local").next().unwrap().to_string());
            }
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Dev { child, base: base.unwrap(), ws: ws.unwrap(), log }
    }

    /// `roomcast ARGS --dev BASE`: (success, stdout and stderr).
    async fn roomcast(&self, args: &[&str]) -> (bool, String) {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.extend(["--dev".to_string(), self.base.clone()]);
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
                .args(&args)
                .env_remove("DYNAMODB_ENDPOINT_URL")
                .output()
                .expect("run roomcast");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
            )
        })
        .await
        .unwrap()
    }

    async fn connect(&self, token: &str, rooms: &str) -> Client {
        let url = format!("{}?token={token}&rooms={rooms}", self.ws);
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        let mut client = Client { socket, seen: Vec::new() };
        client.until("the welcome", |f| f["action"] == "welcome").await;
        client
    }
}

fn token(tenant: &str, user: &str, rooms: Option<Vec<&str>>) -> String {
    let claims = roomcast::auth::Claims {
        tenant: tenant.into(),
        sub: user.into(),
        exp: chrono::Utc::now().timestamp() + 600,
        nbf: None,
        scope: None,
        rooms: rooms.map(|r| r.into_iter().map(str::to_string).collect()),
        extra: Default::default(),
    };
    roomcast::auth::mint(&claims, b"roomcast-dev-secret")
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Client {
    socket: Socket,
    /// Every frame read so far, in order.
    seen: Vec<Value>,
}

impl Client {
    async fn send(&mut self, frame: Value) {
        self.socket.send(Message::text(frame.to_string())).await.unwrap();
    }

    /// Reads frames until one matches (10 s at most), and returns it.
    async fn until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        if let Some(found) = self.seen.iter().find(|f| want(f)) {
            return found.clone();
        }
        let read = async {
            while let Some(message) = self.socket.next().await {
                if let Message::Text(text) = message.unwrap() {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    self.seen.push(frame.clone());
                    if want(&frame) {
                        return frame;
                    }
                }
            }
            panic!("the connection closed before {what}");
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| panic!("no {what} within 10 s; got {:?}", self.seen))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_acl_decides_joins_from_configuration_through_a_running_dev_stack() {
    let dev = Dev::start();
    // Configuration first (a tenant may set it before any upload), then the plugin.
    let (ok, out) =
        dev.roomcast(&["plugin", "config", "set", "--tenant", "acme", "room.vip=ann", "default=allow"]).await;
    assert!(ok, "{out}");
    let (ok, out) = dev.roomcast(&["plugin", "config", "get", "--tenant", "acme", "room.vip"]).await;
    assert_eq!((ok, out.trim()), (true, "ann"));
    let (ok, out) = dev.roomcast(&["plugin", "config", "unset", "--tenant", "acme", "default"]).await;
    assert!(ok && !out.contains("default"), "{out}");
    let big = format!("big={}", "v".repeat(17 << 10));
    let (ok, out) = dev.roomcast(&["plugin", "config", "set", "--tenant", "acme", &big]).await;
    assert!(!ok && out.contains("at most 16384"), "the 16 KB bound: {out}");
    let acl = wasm("roomcast_plugin_rooms_acl").display().to_string();
    let (ok, out) = dev.roomcast(&["plugin", "upload", "--tenant", "acme", "--policy", "closed", &acl]).await;
    assert!(ok, "{out}");
    let mut listed = String::new();
    for _ in 0..100 {
        listed = dev.roomcast(&["plugin", "list", "--tenant", "acme"]).await.1;
        // Active, and known to decide joins (what `$connect` reads to make joins wait).
        if listed.starts_with('*') && listed.contains("decides joins") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed.starts_with('*') && listed.contains("decides joins"), "activated: {listed}");

    let mut ann = dev.connect(&token("acme", "ann", None), "lobby").await;
    let mut eve = dev.connect(&token("acme", "eve", None), "lobby").await;
    eve.send(json!({"action":"join","room":"vip"})).await;
    let denied = eve.until("join_denied", |f| f["action"] == "join_denied").await;
    assert_eq!(denied["room"], "vip");
    assert!(denied["reason"].as_str().unwrap().contains("eve is not on the list"), "{denied}");
    ann.send(json!({"action":"join","room":"vip"})).await;
    let ack =
        ann.until("the vip ack", |f| f["action"] == "ack" && f["room"] == "vip" && f.get("pending").is_none()).await;
    assert_eq!(ack["users"], 1, "{ack}");
    ann.send(json!({"action":"sendMessage","room":"vip","message":"members only"})).await;
    ann.until("the vip message", |f| f["action"] == "message" && f["room"] == "vip").await;
    // A later marker in a room eve is in: everything of vip would have reached her before it.
    ann.send(json!({"action":"sendMessage","room":"lobby","message":"marker"})).await;
    eve.until("the marker", |f| f["message"] == "marker").await;
    let leaked: Vec<&Value> = eve
        .seen
        .iter()
        .filter(|f| f["room"] == "vip" && f["action"] != "join_denied" && f.get("pending").is_none())
        .collect();
    assert!(leaked.is_empty(), "the denied member got {leaked:?}");

    // A new list, no re-upload: eve may join now.
    let (ok, out) = dev.roomcast(&["plugin", "config", "set", "--tenant", "acme", "room.vip=ann,eve"]).await;
    assert!(ok, "{out}");
    eve.send(json!({"action":"join","room":"vip"})).await;
    let ack =
        eve.until("eve's vip ack", |f| f["action"] == "ack" && f["room"] == "vip" && f.get("pending").is_none()).await;
    assert_eq!(ack["users"], 2, "{ack}");
    let listed_again = dev.roomcast(&["plugin", "list", "--tenant", "acme"]).await.1;
    assert_eq!(listed_again.lines().count(), 1, "one version, never re-uploaded: {listed_again}");

    // A token's rooms claim limits rooms in a tenant without any plugin.
    let mut sue = dev.connect(&token("beta", "sue", Some(vec!["support-*"])), "support-1,general").await;
    let welcome = sue.until("the welcome", |f| f["action"] == "welcome").await;
    assert_eq!(welcome["rooms"], json!(["support-1"]), "{welcome}");
    sue.until("join_denied for general", |f| f["action"] == "join_denied" && f["room"] == "general").await;

    // The plugin's log line, in the dev stack's output, with the tenant and the version.
    let version = listed.split_whitespace().nth(1).unwrap().to_string();
    let mut printed = String::new();
    for _ in 0..50 {
        printed = std::fs::read_to_string(&dev.log).unwrap_or_default();
        if printed.contains("denied eve in vip") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = printed.lines().find(|l| l.contains("denied eve in vip")).unwrap_or_else(|| panic!("{printed}"));
    assert!(line.contains("roomcast::plugin_log") && line.contains("acme") && line.contains(&version), "{line}");
    assert!(line.contains("authorize-join"), "{line}");
}
