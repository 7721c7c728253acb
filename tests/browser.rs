//! The browser page, driven in headless Chromium (Debian's `chromium`; `scripts/test` installs
//! it when missing) over the DevTools protocol: two pages in one room exchange messages and see
//! each other's presence; a page that connects later starts its roster from the snapshot; a page
//! that goes offline and comes back has every message (the page is written on
//! `@roomcast/client`). `ROOMCAST_UPDATE_SCREENSHOT=1` also writes `docs/dev-page.png`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium and a DevTools connection to it.
struct Browser {
    child: Child,
    socket: Socket,
    next_id: u64,
    _profile: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium_path() -> PathBuf {
    let path = PathBuf::from(std::env::var("ROOMCAST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    assert!(
        path.exists(),
        "{} is missing: scripts/test installs Debian's chromium (or set ROOMCAST_CHROMIUM)",
        path.display()
    );
    path
}

impl Browser {
    async fn launch() -> Browser {
        // A profile per browser: tests run at once, and Chromium locks its profile.
        static LAUNCHED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = LAUNCHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = TempDir(std::env::temp_dir().join(format!("roomcast-chromium-{}-{n}", std::process::id())));
        std::fs::create_dir_all(&profile.0).unwrap();
        let mut child = Command::new(chromium_path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chromium");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(30)).expect("chromium announces its DevTools endpoint");
        let (socket, _) = tokio_tungstenite::connect_async(url).await.expect("connect to DevTools");
        Browser { child, socket, next_id: 0, _profile: profile }
    }

    /// One DevTools command; events that arrive meanwhile are ignored.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            request["sessionId"] = json!(session);
        }
        self.socket.send(Message::Text(request.to_string().into())).await.unwrap();
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools open")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn open(&mut self, url: &str) -> String {
        self.open_until(url, "document.readyState === 'complete' && !!document.getElementById('connect')").await
    }

    /// Opens `url` in a new tab and waits until `ready` holds there.
    async fn open_until(&mut self, url: &str, ready: &str) -> String {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"})).await;
        let attached =
            self.call(None, "Target.attachToTarget", json!({"targetId": target["targetId"], "flatten": true})).await;
        let session = attached["sessionId"].as_str().unwrap().to_string();
        self.call(
            Some(&session),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1180, "height": 720, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        self.call(Some(&session), "Page.navigate", json!({"url": url})).await;
        self.wait_for(&session, "the page to load", ready).await;
        session
    }

    async fn eval(&mut self, session: &str, expression: &str) -> Value {
        let out = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(out.get("exceptionDetails").is_none(), "{expression}: {out}");
        out["result"]["value"].clone()
    }

    async fn wait_for(&mut self, session: &str, what: &str, condition: &str) {
        for _ in 0..200 {
            if self.eval(session, condition).await == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log =
            self.eval(session, "document.getElementById('log') ? document.getElementById('log').innerText : ''").await;
        panic!("timed out waiting for {what}; the page's log:\n{log}");
    }

    async fn click(&mut self, session: &str, id: &str) {
        self.eval(session, &format!("document.getElementById('{id}').click()")).await;
    }

    async fn type_into(&mut self, session: &str, id: &str, text: &str) {
        self.eval(session, &format!("document.getElementById('{id}').value = {}", json!(text))).await;
    }
}

fn log_has(action: &str, text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#log li[data-action=\"{action}\"]')].some(li => li.textContent.includes({}))",
        json!(text)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_in_one_room_exchange_messages_and_see_each_others_presence() {
    let stack = roomcast::dev::start(roomcast::dev::DevOptions { port: 0, ..Default::default() }).await.unwrap();
    let mut browser = Browser::launch().await;
    let page = |user: &str| format!("{}?tenant=acme&user={user}&rooms=general&room=general", stack.page_url());

    let ann = browser.open(&page("ann")).await;
    browser.click(&ann, "connect").await;
    browser.wait_for(&ann, "ann's welcome", &log_has("welcome", "connected as ann")).await;

    let bob = browser.open(&page("bob")).await;
    browser.click(&bob, "connect").await;
    browser.wait_for(&bob, "bob's welcome", &log_has("welcome", "connected as bob")).await;
    browser.wait_for(&ann, "bob's presence on ann's page", &log_has("presence", "bob joined #general")).await;

    browser.type_into(&bob, "text", "hello from bob").await;
    browser.click(&bob, "send").await;
    browser.wait_for(&ann, "bob's message on ann's page", &log_has("message", "#general bob: hello from bob")).await;
    browser.type_into(&ann, "text", "hi bob, ann here").await;
    browser.click(&ann, "send").await;
    browser.wait_for(&bob, "ann's message on bob's page", &log_has("message", "#general ann: hi bob, ann here")).await;
    browser
        .wait_for(&ann, "the roster", "document.getElementById('presence').innerText.includes('bob in #general')")
        .await;

    if std::env::var_os("ROOMCAST_UPDATE_SCREENSHOT").is_some() {
        let shot = browser.call(Some(&ann), "Page.captureScreenshot", json!({"format": "png"})).await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dev-page.png");
        std::fs::write(&path, png).unwrap();
    }

    // A page that connects later starts its roster from the snapshot (`who` for the rooms it
    // joined at connect): Ann and Bob joined before it existed, and no event told it of them.
    let cid = browser.open(&page("cid")).await;
    browser.click(&cid, "connect").await;
    let roster = |user: &str| format!("document.getElementById('presence').innerText.includes('{user} in #general')");
    browser
        .wait_for(
            &cid,
            "the roster from the snapshot",
            &format!("{} && {} && {}", roster("ann"), roster("bob"), roster("cid")),
        )
        .await;
    browser
        .wait_for(
            &cid,
            "the room's count",
            "document.getElementById('presence').innerText.includes('#general · 3 here')",
        )
        .await;

    browser.click(&ann, "disconnect").await;
    browser
        .wait_for(&bob, "ann's departure on bob's page", &log_has("presence", "ann left #general (disconnect)"))
        .await;
    // And it follows the events from there.
    browser.wait_for(&cid, "ann gone from the roster", &format!("!{} && {}", roster("ann"), roster("bob"))).await;
    browser
        .wait_for(
            &cid,
            "the count follows",
            "document.getElementById('presence').innerText.includes('#general · 2 here')",
        )
        .await;
    stack.shutdown().await;
}

/// Lambda's event source may deliver a batch twice; `roomcast dev --redeliver` does it every
/// time. The page shows each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_redelivered_message_once() {
    let options = roomcast::dev::DevOptions { port: 0, redeliver: true, ..Default::default() };
    let stack = roomcast::dev::start(options).await.unwrap();
    let mut browser = Browser::launch().await;
    let page = |user: &str| format!("{}?tenant=acme&user={user}&rooms=general&room=general", stack.page_url());
    let ann = browser.open(&page("ann")).await;
    browser.click(&ann, "connect").await;
    browser.wait_for(&ann, "ann's welcome", &log_has("welcome", "connected as ann")).await;
    for text in ["first", "second", "marker"] {
        browser.type_into(&ann, "text", text).await;
        browser.click(&ann, "send").await;
        browser.wait_for(&ann, text, &log_has("message", &format!("ann: {text}"))).await;
    }
    // Both deliveries of "first" and "second" came before "marker" was even sent.
    let count = |text: &str| {
        format!(
            "[...document.querySelectorAll('#log li[data-action=\"message\"]')].filter(li => li.textContent.includes({})).length",
            json!(format!("ann: {text}"))
        )
    };
    for text in ["first", "second"] {
        browser.wait_for(&ann, &format!("{text} shown once"), &format!("{} === 1", count(text))).await;
    }
    browser.wait_for(&ann, "the repeats dropped", "Number(document.body.dataset.repeatsDropped || 0) >= 2").await;
    stack.shutdown().await;
}

/// The page is written on `@roomcast/client`: a page whose connection drops while its network
/// is down reconnects when the network comes back and has every message — those sent meanwhile
/// recovered with `since`, in order, then the live ones — each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_goes_offline_and_comes_back_has_every_message() {
    let stack = roomcast::dev::start(roomcast::dev::DevOptions { port: 0, ..Default::default() }).await.unwrap();
    let mut browser = Browser::launch().await;
    let page = |user: &str| format!("{}?tenant=acme&user={user}&rooms=general&room=general", stack.page_url());
    let ann = browser.open(&page("ann")).await;
    browser.click(&ann, "connect").await;
    browser.wait_for(&ann, "ann's welcome", &log_has("welcome", "connected as ann")).await;
    let bob = browser.open(&page("bob")).await;
    browser.click(&bob, "connect").await;
    browser.wait_for(&bob, "bob's welcome", &log_has("welcome", "connected as bob")).await;

    browser.type_into(&bob, "text", "before").await;
    browser.click(&bob, "send").await;
    browser.wait_for(&ann, "before", &log_has("message", "bob: before")).await;

    // Ann's network goes down, and her connection is dropped (as API Gateway drops an idle or
    // two-hour-old one): her page cannot reconnect until the network is back.
    browser.call(Some(&ann), "Network.enable", json!({})).await;
    let offline = json!({"offline": true, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1});
    browser.call(Some(&ann), "Network.emulateNetworkConditions", offline).await;
    let id = browser.eval(&ann, "document.body.dataset.connectionId").await;
    let id = id.as_str().expect("the page shows its connection id").to_string();
    let deleted = browser
        .eval(
            &bob,
            &format!(
                "fetch('/local/@connections/' + encodeURIComponent({}), {{method: 'DELETE'}}).then(r => r.status)",
                json!(id)
            ),
        )
        .await;
    assert!(deleted == json!(204) || deleted == json!(200), "{deleted}");
    browser
        .wait_for(
            &ann,
            "ann's page to notice",
            "document.getElementById('status').textContent.startsWith('reconnecting')",
        )
        .await;
    for text in ["while-1", "while-2", "while-3"] {
        browser.type_into(&bob, "text", text).await;
        browser.click(&bob, "send").await;
        browser.wait_for(&bob, text, &log_has("message", &format!("bob: {text}"))).await;
    }
    let online = json!({"offline": false, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1});
    browser.call(Some(&ann), "Network.emulateNetworkConditions", online).await;
    browser.wait_for(&ann, "the recovery", &log_has("recover", "#general: every missed message")).await;
    browser.type_into(&bob, "text", "after").await;
    browser.click(&bob, "send").await;
    browser.wait_for(&ann, "the live message after", &log_has("message", "bob: after")).await;

    let entries = browser
        .eval(
            &ann,
            "[...document.querySelectorAll('#log li[data-action=\"message\"], #log li[data-action=\"recover\"]')].map(li => li.textContent)",
        )
        .await;
    let entries: Vec<String> = entries.as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
    let order: Vec<&str> = entries
        .iter()
        .map(|e| if e.starts_with("recover") { "recover" } else { e.rsplit(": ").next().unwrap() })
        .collect();
    // The missed ones came through the recovery (before its entry), the last one live after it.
    assert_eq!(order, ["before", "while-1", "while-2", "while-3", "recover", "after"], "{entries:?}");
    stack.shutdown().await;
}

/// The dev page shows the tenant's webhook deliveries as `roomcast dev` attempts them: a
/// receiver on loopback refuses the first, so the page lists it `retrying` (with the error), then
/// `delivered`, with the events' types; and a backend's message to the page's user
/// (`send_to_user`) shows in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_tenants_webhook_deliveries_and_messages_to_its_user() {
    use std::sync::atomic::Ordering::SeqCst;
    let (receiver, url) = roomcast_tests::WebhookReceiver::start().await;
    receiver.refuse_first.store(1, SeqCst);
    let mut options = roomcast::dev::DevOptions { port: 0, ..Default::default() };
    options.webhook_retry.first_delay = Duration::from_millis(200);
    let stack = roomcast::dev::start(options).await.unwrap();
    let settings = roomcast::model::TenantSettings {
        webhook: Some(roomcast::model::WebhookSettings {
            url: format!("{url}/ok"),
            secret: "acme-webhook-secret".into(),
            events: Vec::new(),
        }),
        ..roomcast::model::TenantSettings::new("acme")
    };
    stack.store.put_tenant_settings(&settings).await.unwrap();
    let mut browser = Browser::launch().await;
    let page = format!("{}?tenant=acme&user=ann&rooms=general&room=general", stack.page_url());
    let ann = browser.open(&page).await;
    browser.click(&ann, "connect").await;
    browser.wait_for(&ann, "ann's welcome", &log_has("welcome", "connected as ann")).await;
    let listed = |outcome: &str, text: &str| {
        format!(
            "[...document.querySelectorAll('#deliveries li[data-outcome=\"{outcome}\"]')].some(li => li.textContent.includes({}))",
            json!(text)
        )
    };
    browser.wait_for(&ann, "the refused attempt", &listed("retrying", "503")).await;
    browser.wait_for(&ann, "the delivery", &listed("delivered", "connection.opened")).await;
    browser.wait_for(&ann, "the hint gone", "document.getElementById('deliveries-hint').hidden").await;
    let events = receiver.events("ok", "acme-webhook-secret");
    assert!(events.iter().any(|e| e["type"] == "connection.opened" && e["user_id"] == "ann"), "{events:?}");

    let token = roomcast_tests::users_token("acme", b"roomcast-dev-secret");
    let body =
        json!({"action": "send_to_user", "tenant": "acme", "user_id": "ann", "message": "paid", "from": "billing"});
    let base = format!("http://{}", stack.addr);
    let sent = roomcast::dev::api::request_as(
        &base,
        axum::http::Method::POST,
        "/publish",
        body.to_string().into_bytes(),
        Some(&token),
    )
    .await
    .unwrap();
    assert_eq!(sent["connections"], 1, "{sent}");
    browser.wait_for(&ann, "the user message", &log_has("user_message", "from billing: paid")).await;
    stack.shutdown().await;
}

/// The operator's page (issue 28): tenants with their rooms, members and presence, connections,
/// plugin versions with status and the breaker, as the stack holds them, refreshed as they
/// change. `ROOMCAST_UPDATE_SCREENSHOT=1` writes `docs/ops-page.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_page_shows_tenants_rooms_connections_and_plugins() {
    let stack = roomcast::dev::start(roomcast::dev::DevOptions { port: 0, ..Default::default() }).await.unwrap();
    let host = roomcast::plugins::PluginHost::new().unwrap();
    let bytes = roomcast_tests::component("roomcast-plugin-moderation");
    let none = roomcast::plugins::LimitOverrides::default();
    let meta = roomcast::plugins::upload(
        &*stack.store,
        &host,
        "acme",
        &bytes,
        roomcast::model::FailurePolicy::Open,
        none,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let mut browser = Browser::launch().await;
    let page = |user: &str| format!("{}?tenant=acme&user={user}&rooms=general&room=general", stack.page_url());
    for user in ["ann", "bob"] {
        let tab = browser.open(&page(user)).await;
        browser.click(&tab, "connect").await;
        browser.wait_for(&tab, "the welcome", &log_has("welcome", &format!("connected as {user}"))).await;
    }
    let ops = browser
        .open_until(&format!("http://{}/_dev/ops", stack.addr), "!!document.body && !!document.body.dataset.refreshed")
        .await;
    let tenant = "document.querySelector('[data-tenant=\"acme\"]')";
    let shows = |text: &str| format!("!!{tenant} && {tenant}.innerText.includes({})", json!(text));
    browser.wait_for(&ops, "acme's room with both users", &format!("{} && {}", shows("ann×1"), shows("bob×1"))).await;
    browser
        .wait_for(
            &ops,
            "the plugin running, its breaker closed",
            &format!("{} && {}", shows(&format!("running {}", meta.version)), shows("breaker closed")),
        )
        .await;
    browser.wait_for(&ops, "the version's status", &shows("active")).await;
    browser
        .wait_for(&ops, "the connections", "document.getElementById('connections').innerText.includes('ann') && document.getElementById('connections').innerText.includes('bob')")
        .await;
    if std::env::var_os("ROOMCAST_UPDATE_SCREENSHOT").is_some() {
        let shot = browser.call(Some(&ops), "Page.captureScreenshot", json!({"format": "png"})).await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::write(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/ops-page.png"), png).unwrap();
    }
    stack.shutdown().await;
}
