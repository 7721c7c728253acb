//! A tenant's backend for the webhook tests: a real HTTP server on loopback that checks nothing
//! itself and keeps what it accepted, with the signature header, for the test to verify.

use std::time::Duration;

use serde_json::Value;

/// A tenant's backend on loopback: `/ok` takes deliveries after refusing the first
/// `refuse_first`, `/ok-too` takes them all; `/hang` holds every request until released, then refuses it; `/refuse`
/// refuses while `refusing` is set.
#[derive(Default)]
pub struct WebhookReceiver {
    pub refuse_first: std::sync::atomic::AtomicUsize,
    pub refused: std::sync::atomic::AtomicUsize,
    pub refusing: std::sync::atomic::AtomicBool,
    pub hanging: std::sync::atomic::AtomicUsize,
    pub release: tokio::sync::Notify,
    pub released: std::sync::atomic::AtomicBool,
    /// Accepted deliveries: the path, the signature header, the body.
    pub got: std::sync::Mutex<Vec<(String, String, Vec<u8>)>>,
}

impl WebhookReceiver {
    pub async fn start() -> (std::sync::Arc<WebhookReceiver>, String) {
        use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
        use std::sync::atomic::Ordering::SeqCst;
        let receiver = std::sync::Arc::new(WebhookReceiver::default());
        async fn take(
            State(r): State<std::sync::Arc<WebhookReceiver>>,
            axum::extract::Path(path): axum::extract::Path<String>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            let refuse = match path.as_str() {
                "ok" => r.refuse_first.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok(),
                "ok-too" => false,
                "refuse" => r.refusing.load(SeqCst),
                _ => {
                    r.hanging.fetch_add(1, SeqCst);
                    // Registered before the flag is read: a release in between still wakes it.
                    let released = r.release.notified();
                    tokio::pin!(released);
                    released.as_mut().enable();
                    if !r.released.load(SeqCst) {
                        released.await;
                    }
                    r.hanging.fetch_sub(1, SeqCst);
                    true
                }
            };
            if refuse {
                r.refused.fetch_add(1, SeqCst);
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            let signature = headers.get("roomcast-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            r.got.lock().unwrap().push((path, signature, body.to_vec()));
            StatusCode::OK
        }
        let app = Router::new().route("/{path}", post(take)).with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, url)
    }

    pub fn release(&self) {
        self.released.store(true, std::sync::atomic::Ordering::SeqCst);
        self.release.notify_waiters();
    }

    /// The events accepted at `path`, each delivery's signature checked with `secret`.
    pub fn events(&self, path: &str, secret: &str) -> Vec<Value> {
        let now = chrono::Utc::now().timestamp();
        let got = self.got.lock().unwrap();
        let mut events = Vec::new();
        for (at, signature, body) in got.iter().filter(|(at, ..)| at == path) {
            roomcast::webhook::sign::verify(secret, signature, body, now)
                .unwrap_or_else(|e| panic!("a delivery to /{at} does not verify: {e}"));
            let batch: Value = serde_json::from_slice(body).unwrap();
            events.extend(batch["events"].as_array().unwrap().iter().cloned());
        }
        events
    }

    /// Waits until the events accepted at `path` hold one of `kind` for `user` (10 s at most).
    pub async fn wait_for(&self, path: &str, secret: &str, kind: &str, user: &str) -> Vec<Value> {
        for _ in 0..200 {
            let events = self.events(path, secret);
            if events.iter().any(|e| e["type"] == kind && e["user_id"].as_str().unwrap_or("") == user) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {kind} for {user} at /{path} within 10 s: {:?}", self.events(path, secret));
    }
}
