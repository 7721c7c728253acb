//! The operator's page of `roomcast dev` (`/_dev/ops`): what the system holds now — tenants with
//! their rooms, members and presence, connections with the labels they connected with, plugin
//! versions with their status and this process's breaker, recent webhook deliveries, and the
//! processor's counters. Read-only; the page polls `GET /_dev/ops/state`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::plugins::registry::Registry;
use crate::store::Store;

/// The most connections the page reads (a dev stack's scale).
pub const MAX_CONNECTIONS: usize = 1000;

#[derive(Clone)]
struct Ops {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    webhooks: Arc<crate::webhook::local::LocalWebhooks>,
}

pub fn routes(
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    webhooks: Arc<crate::webhook::local::LocalWebhooks>,
) -> axum::Router {
    axum::Router::new().route("/_dev/ops", get(page)).route("/_dev/ops/state", get(state)).with_state(Ops {
        store,
        registry,
        metrics,
        webhooks,
    })
}

async fn page() -> Html<&'static str> {
    Html(include_str!("ops.html"))
}

async fn state(State(ops): State<Ops>) -> Response {
    match read(&ops).await {
        Ok(state) => axum::Json(state).into_response(),
        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn read(ops: &Ops) -> Result<Value, crate::store::StoreError> {
    let now = chrono::Utc::now();
    let connections = ops.store.scan_connections(MAX_CONNECTIONS, None).await?;
    let connections: Vec<_> = connections.into_iter().filter(|c| !crate::model::is_expired(c.ttl, now)).collect();
    let mut rooms_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in &connections {
        rooms_of.entry(c.tenant.clone()).or_default().extend(c.rooms.iter().cloned());
    }
    let mut tenants = Vec::new();
    for (tenant, rooms) in &rooms_of {
        let mut room_views = Vec::new();
        for room in rooms {
            let members = ops.store.room_members(tenant, room, now).await?;
            let who = ops.store.who(tenant, room, crate::protocol::MAX_WHO_PAGE, None).await?;
            room_views.push(json!({
                "room": room,
                "users": who.total,
                "present": who.users.iter().map(|(user, n)| json!({"user_id": user, "connections": n})).collect::<Vec<_>>(),
                "members": members.iter().map(|m| json!({"user_id": m.user_id, "connection_id": m.connection_id, "pending": m.pending == Some(true)})).collect::<Vec<_>>(),
            }));
        }
        let versions = ops.store.plugins(tenant).await?;
        let active = ops.store.active_plugin(tenant).await?;
        let breaker = ops.registry.breaker(tenant);
        let settings = ops.store.tenant_settings(tenant).await?;
        tenants.push(json!({
            "tenant": tenant,
            "connections": connections.iter().filter(|c| &c.tenant == tenant).count(),
            "rooms": room_views,
            "plugin": {
                "active": active.as_ref().map(|a| a.version.clone()),
                "running": ops.registry.installed_version(tenant),
                "faults_in_a_row": breaker.map(|(n, _)| n),
                "breaker_open": breaker.map(|(_, open)| open),
                "versions": versions.iter().map(|v| json!({"version": v.version, "status": v.status, "reason": v.reason, "uploaded_at": crate::model::format_ts(&v.uploaded_at)})).collect::<Vec<_>>(),
            },
            "webhook": settings.and_then(|s| s.webhook).map(|w| w.url),
        }));
    }
    let mut deliveries = ops.webhooks.deliveries(None);
    let recent = deliveries.split_off(deliveries.len().saturating_sub(50));
    let counts = serde_json::to_value(ops.metrics.snapshot()).unwrap_or(Value::Null);
    Ok(json!({
        "tenants": tenants,
        "connections": connections.iter().map(|c| json!({
            "connection_id": c.connection_id,
            "tenant": c.tenant,
            "user_id": c.user_id,
            "rooms": c.rooms,
            "connected_at": crate::model::format_ts(&c.connected_at),
            "last_seen_at": crate::model::format_ts(&c.last_seen_at),
            "deployment_id": c.deployment_id,
            "connection_type": c.connection_type,
        })).collect::<Vec<_>>(),
        "deliveries": recent,
        "counts": counts,
    }))
}
