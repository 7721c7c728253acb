//! Things made by hand: tokens, plugin components, connection records.

use super::*;

/// A tenant backend's publish token (scope `publish`), valid ten minutes.
pub fn publish_token(tenant: &str, secret: &[u8]) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    let claims = roomcast::auth::Claims {
        tenant: tenant.into(),
        sub: "shop".into(),
        exp,
        nbf: None,
        scope: Some("publish".into()),
        rooms: None,
        extra: Default::default(),
    };
    roomcast::auth::mint(&claims, secret)
}

/// A tenant backend's token for acting on its users (scope `users`), valid ten minutes.
pub fn users_token(tenant: &str, secret: &[u8]) -> String {
    let claims = roomcast::auth::Claims {
        tenant: tenant.into(),
        sub: "admin".into(),
        exp: chrono::Utc::now().timestamp() + 600,
        nbf: None,
        scope: Some("users".into()),
        rooms: None,
        extra: Default::default(),
    };
    roomcast::auth::mint(&claims, secret)
}

pub fn sign_hs256(signed: &str, secret: &[u8]) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signed.as_bytes());
    format!("{signed}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// A component built from this workspace for wasm32-wasip2 (`scripts/test` builds them first).
pub fn component(crate_name: &str) -> Vec<u8> {
    let file = crate_name.replace('-', "_");
    let path = target_dir().join(format!("wasm32-wasip2/release/{file}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build the components first: scripts/test does, or \
             cargo build --release --target wasm32-wasip2 -p {crate_name}",
            path.display()
        )
    })
}

/// A plugin written by hand (`tests/fixtures/memories.wat`) whose component instantiates `hogs`
/// core modules of `pages` 64 KiB pages of memory each; otherwise it accepts everything.
pub fn memories_component(hogs: usize, pages: u32) -> Vec<u8> {
    wat_plugin(hogs, pages, false)
}

/// The same plugin, whose module loops without end in its start function (at instantiation).
pub fn looping_at_start_component() -> Vec<u8> {
    wat_plugin(0, 1, true)
}

fn wat_plugin(hogs: usize, pages: u32, spin_at_start: bool) -> Vec<u8> {
    let text = include_str!("../fixtures/memories.wat")
        .replace("@START@", if spin_at_start { "(start $spin)" } else { "" })
        .replace("@PAGES@", &pages.to_string())
        .replace("@HOGS@", &"(core instance (instantiate $hog))\n".repeat(hogs));
    wat::parse_str(&text).expect("the fixture is valid")
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` when set, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A connection record as the `$connect` handler writes it, for store-level tests.
pub fn test_connection(
    id: &str,
    tenant: &str,
    user: &str,
    rooms: &[&str],
    at: chrono::DateTime<chrono::Utc>,
) -> roomcast::model::Connection {
    roomcast::model::Connection::new(roomcast::model::NewConnection {
        connection_id: id,
        tenant: &roomcast::model::Name::parse("tenant", tenant).unwrap(),
        user_id: user,
        connection_type: Some("client".into()),
        deployment_id: Some("d1".into()),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        endpoint: "https://abc.execute-api.us-east-1.amazonaws.com/prod".into(),
        now: at,
        ttl_seconds: 600,
    })
}

/// Writes `c` and a membership for each of its rooms, as `$connect` does.
pub async fn put_test_connection(table: &Table, c: &roomcast::model::Connection, at: chrono::DateTime<chrono::Utc>) {
    let memberships: Vec<_> =
        c.rooms.iter().map(|r| c.membership(r, roomcast::model::JoinReason::Connect, at)).collect();
    table.store.put_connection(c, &memberships).await.unwrap();
}
