//! Operations for operators (a connection manager's operations): the `admin` Lambda (direct invoke),
//! `roomcast admin`, and the scheduled `sweeper`.
//!
//! | event `action`              | fields                          | answer body |
//! |-----------------------------|---------------------------------|-------------|
//! | `get_user_connections`      | `tenant`, `userId`              | `{connections, count}` |
//! | `get_all_connections`       | `limit?`, `nextToken?`          | `{connections, count, nextToken?}` |
//! | `update_connection_status`  | `connectionId`, `status`        | `{connection}`; 404 when unknown |
//! | `cleanup_stale_connections` | `idleSeconds?`                  | `{message, cleanedCount, checked, stillOpen, unknown, presenceRepaired}` |
//!
//! Every answer is `{statusCode, body}`; an invalid event gets 400 with the reason.
//!
//! The sweep: a connection record past its TTL, or silent for longer than the idle limit, is
//! confirmed with `GetConnection`; on 410 it is deleted (reason `expired` or `gone`), which
//! announces presence `left` through the stream — within minutes, although DynamoDB's TTL can
//! take days.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::model::{Clock, Connection, LeftReason, format_ts, is_expired};
use crate::store::{Store, StoreError};
use roomcast_processor::deliver::{Deliverer, Probe};

pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;

#[derive(Debug, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum AdminRequest {
    GetUserConnections {
        tenant: String,
        #[serde(rename = "userId")]
        user_id: String,
    },
    GetAllConnections {
        #[serde(default)]
        limit: Option<usize>,
        #[serde(default, rename = "nextToken")]
        next_token: Option<String>,
    },
    UpdateConnectionStatus {
        #[serde(rename = "connectionId")]
        connection_id: String,
        status: String,
    },
    CleanupStaleConnections {
        #[serde(default, rename = "idleSeconds")]
        idle_seconds: Option<u64>,
    },
}

/// A connection as the admin operations show it (the operator-facing fields first).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    pub connection_id: String,
    pub user_id: String,
    pub status: String,
    pub created_at: String,
    pub tenant: String,
    pub rooms: Vec<String>,
    pub last_seen_at: String,
    /// The labels the client gave at connect (`?deployment_id=`, `?connection_type=`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_type: Option<String>,
}

impl From<&Connection> for ConnectionView {
    fn from(c: &Connection) -> Self {
        ConnectionView {
            connection_id: c.connection_id.clone(),
            user_id: c.user_id.clone(),
            status: c.status.clone(),
            created_at: format_ts(&c.connected_at),
            tenant: c.tenant.clone(),
            rooms: c.rooms.iter().cloned().collect(),
            last_seen_at: format_ts(&c.last_seen_at),
            deployment_id: c.deployment_id.clone(),
            connection_type: c.connection_type.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SweepReport {
    /// Records past their TTL or silent too long, asked about.
    pub checked: usize,
    /// Confirmed gone (410) and deleted.
    pub cleaned: usize,
    /// Still open at API Gateway: kept.
    pub still_open: usize,
    /// No clear answer: kept for the next sweep.
    pub unknown: usize,
    /// Present connections found without a live membership (a REMOVE lost, or on its way).
    pub presence_suspected: usize,
    /// Of those, suspect for longer than the grace: taken out of presence.
    pub presence_repaired: usize,
    /// Another run held the lease: this one did nothing.
    #[serde(default)]
    pub skipped: bool,
    /// Sweep shards this run went through (of [`crate::model::SWEEP_SHARDS`]); fewer when its
    /// time ran short: the next run goes on from where it stopped.
    #[serde(default)]
    pub shards: u32,
    /// Of those, shards that failed (logged) and were passed over.
    #[serde(default)]
    pub failed_shards: u32,
    /// Shards whose presence reconciliation the run's time cut short (their users not reached
    /// are reconciled on the next cycle).
    #[serde(default)]
    pub reconcile_cut_short: u32,
}

/// A sweep stops this long before its invocation's deadline, and records where.
pub const SWEEP_RESERVE: std::time::Duration = std::time::Duration::from_secs(20);
/// How long a run holds the lease at most (the sweeper's timeout, 300 s): a run that died
/// without giving it back holds up the next ones no longer.
pub const SWEEP_LEASE_SECONDS: i64 = 300;
/// Whether a run that must finish by `finish_by` has less than [`SWEEP_RESERVE`] left.
fn out_of_time(finish_by: Option<std::time::Instant>) -> bool {
    finish_by.is_some_and(|at| at.saturating_duration_since(std::time::Instant::now()) < SWEEP_RESERVE)
}

/// Stale connections a sweep asks API Gateway about at once (`GetConnection` calls in flight).
pub const SWEEP_PROBES: usize = 16;

pub struct Admin {
    pub store: Arc<dyn Store>,
    pub deliverer: Arc<Deliverer>,
    pub clock: Arc<dyn Clock>,
    /// Connections silent this long are checked (API Gateway's idle timeout: 10 minutes).
    pub idle_limit: Duration,
    /// How long a present connection may go without a live membership before the sweep takes
    /// it out ([`crate::presence::RECONCILE_GRACE_SECONDS`] unless configured).
    pub presence_grace: Duration,
    /// Connections' TTL (`CONNECTION_TTL_SECONDS`): one last seen longer ago has expired, so
    /// the sweep asks the index for connections silent for the shorter of this and `idle`.
    pub connection_ttl: Duration,
}

fn answer(status: u16, body: Value) -> Value {
    json!({ "statusCode": status, "body": body })
}

fn invalid(reason: impl Into<String>) -> Value {
    answer(400, json!({ "message": reason.into() }))
}

impl Admin {
    /// One admin event, as the Lambda receives it.
    pub async fn handle(&self, event: &Value) -> Value {
        let request: AdminRequest = match serde_json::from_value(event.clone()) {
            Ok(r) => r,
            Err(e) => return invalid(format!("invalid admin event: {e}")),
        };
        match self.run(request).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::error!(error = %err, "admin operation failed");
                answer(500, json!({ "message": err.to_string() }))
            }
        }
    }

    async fn run(&self, request: AdminRequest) -> Result<Value, StoreError> {
        let now = self.clock.now();
        Ok(match request {
            AdminRequest::GetUserConnections { tenant, user_id } => {
                if tenant.is_empty() || user_id.is_empty() {
                    return Ok(invalid("tenant and userId are required"));
                }
                let found = self.store.user_connections(&tenant, &user_id, now).await?;
                let views: Vec<ConnectionView> = found.iter().map(Into::into).collect();
                answer(200, json!({ "connections": views, "count": views.len() }))
            }
            AdminRequest::GetAllConnections { limit, next_token } => {
                let limit = limit.unwrap_or(DEFAULT_PAGE);
                if !(1..=MAX_PAGE).contains(&limit) {
                    return Ok(invalid(format!("limit must be from 1 to {MAX_PAGE}")));
                }
                // Expired records are not "active"; they still advance the page.
                let page = self.store.scan_connections(limit, next_token.as_deref()).await?;
                let next = (page.len() == limit).then(|| page.last().map(|c| c.connection_id.clone())).flatten();
                let views: Vec<ConnectionView> =
                    page.iter().filter(|c| !is_expired(c.ttl, now)).map(Into::into).collect();
                let mut body = json!({ "connections": views, "count": views.len() });
                if let Some(next) = next {
                    body["nextToken"] = json!(next);
                }
                answer(200, body)
            }
            AdminRequest::UpdateConnectionStatus { connection_id, status } => {
                let valid = !status.is_empty()
                    && status.len() <= 32
                    && status.chars().all(|c| c.is_ascii_uppercase() || c == '_');
                if !valid {
                    return Ok(invalid("status must be 1 to 32 of A-Z and _, e.g. DISCONNECTED"));
                }
                match self.store.set_status(&connection_id, &status).await? {
                    Some(c) => answer(200, json!({ "connection": ConnectionView::from(&c) })),
                    None => answer(404, json!({ "message": format!("no connection {connection_id}") })),
                }
            }
            AdminRequest::CleanupStaleConnections { idle_seconds } => {
                let idle = idle_seconds.map_or(self.idle_limit, Duration::from_secs);
                // Within the admin function's 300 s, as the sweeper's own runs are.
                let finish_by = std::time::Instant::now() + Duration::from_secs(SWEEP_LEASE_SECONDS as u64);
                let report = self.sweep_until(idle, Some(finish_by)).await?;
                answer(
                    200,
                    json!({
                        "message": "Stale connections cleaned up",
                        "cleanedCount": report.cleaned,
                        "checked": report.checked,
                        "stillOpen": report.still_open,
                        "unknown": report.unknown,
                        "presenceRepaired": report.presence_repaired,
                        "skipped": report.skipped,
                        "shards": report.shards,
                        "failedShards": report.failed_shards,
                    }),
                )
            }
        })
    }

    /// [`Admin::sweep_until`] with no deadline.
    pub async fn sweep(&self, idle: Duration) -> Result<SweepReport, StoreError> {
        self.sweep_until(idle, None).await
    }

    /// Finds stale connection records, confirms each with `GetConnection`, deletes the gone.
    ///
    /// It reads only stale connections: the sparse `sweep` index holds connection items by
    /// `lastSeenAt` in [`crate::model::SWEEP_SHARDS`] keys, and each key is asked for those last
    /// seen more than `idle` (or its TTL, if shorter: an expired one) ago; then the present users
    /// of the presence key of the same number are reconciled with their rooms' memberships.
    ///
    /// One run at a time: it takes the table's lease first (another run holding it: `skipped`),
    /// under a token of its own, and records after each shard where the next run starts, so a
    /// run cut short by its timeout loses at most the shard it was in. It stops
    /// [`SWEEP_RESERVE`] before `finish_by`. A shard that fails (throttling past the SDK's
    /// retries, an item that cannot be written) is logged, counted in `failed_shards`, and
    /// passed over: it holds up no other shard, and the next full cycle tries it again. A run
    /// whose lease ran out and was taken by another stops where it is.
    pub async fn sweep_until(
        &self,
        idle: Duration,
        finish_by: Option<std::time::Instant>,
    ) -> Result<SweepReport, StoreError> {
        let now = self.clock.now();
        let idle = chrono::Duration::from_std(idle).unwrap_or(chrono::Duration::MAX);
        let mut report = SweepReport::default();
        let owner = uuid::Uuid::now_v7().to_string();
        let lease_until = now.timestamp() + SWEEP_LEASE_SECONDS;
        let Some(start) = self.store.take_sweep_lease(now.timestamp(), lease_until, &owner).await? else {
            tracing::info!("another sweep holds the lease: skipped");
            report.skipped = true;
            return Ok(report);
        };
        let ttl = chrono::Duration::from_std(self.connection_ttl).unwrap_or(chrono::Duration::MAX);
        let cutoff = now.checked_sub_signed(idle.min(ttl)).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        let out_of_time = || out_of_time(finish_by);
        let mut next = start;
        let mut held = true;
        for i in 0..crate::model::SWEEP_SHARDS {
            let shard = (start + i) % crate::model::SWEEP_SHARDS;
            if out_of_time() {
                tracing::info!(next_shard = shard, "sweep out of time: the next run goes on");
                break;
            }
            match self.sweep_shard(shard, cutoff, now, finish_by, &mut report).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(next_shard = shard, "sweep out of time within a shard: the next run does it again");
                    break;
                }
                Err(err) => {
                    tracing::error!(shard, error = %err, "a sweep shard failed: passed over, tried again next cycle");
                    report.failed_shards += 1;
                }
            }
            report.shards += 1;
            next = (shard + 1) % crate::model::SWEEP_SHARDS;
            if i + 1 < crate::model::SWEEP_SHARDS && !self.store.sweep_progress(&owner, next, false).await? {
                held = false;
                tracing::warn!(next_shard = next, "the sweep's lease ran out and another run took it: stopped");
                break;
            }
        }
        if held && !self.store.sweep_progress(&owner, next, true).await? {
            tracing::warn!("the sweep's lease ran out before the run gave it back");
        }
        tracing::info!(
            checked = report.checked,
            cleaned = report.cleaned,
            still_open = report.still_open,
            unknown = report.unknown,
            presence_suspected = report.presence_suspected,
            presence_repaired = report.presence_repaired,
            reconcile_cut_short = report.reconcile_cut_short,
            failed_shards = report.failed_shards,
            shards = report.shards,
            "roomcast.sweep"
        );
        Ok(report)
    }

    /// One shard: its stale connections, then its present users. False when the run's time ran
    /// short before every stale connection was asked about.
    async fn sweep_shard(
        &self,
        shard: u32,
        cutoff: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
        finish_by: Option<std::time::Instant>,
        report: &mut SweepReport,
    ) -> Result<bool, StoreError> {
        let stale = self.store.stale_connections(shard, cutoff).await?;
        if !self.check_connections(stale, now, finish_by, report).await? {
            return Ok(false);
        }
        self.reconcile_presence(shard, finish_by, report).await?;
        Ok(true)
    }

    /// Asks API Gateway about each stale connection, [`SWEEP_PROBES`] at a time (each answer
    /// takes tens of milliseconds: one by one, 10,000 stale connections after a network blip
    /// would take minutes), deletes the gone and marks the open as seen. False when the run's
    /// time ran short before all were asked: the shard is left for the next run, which asks only
    /// about those still stale (a deleted connection, or one marked seen, is not).
    async fn check_connections(
        &self,
        stale: Vec<crate::model::Connection>,
        now: chrono::DateTime<chrono::Utc>,
        finish_by: Option<std::time::Instant>,
        report: &mut SweepReport,
    ) -> Result<bool, StoreError> {
        use futures::StreamExt;
        let out_of_time = || out_of_time(finish_by);
        let mut results = futures::stream::iter(stale)
            .map(|conn| async move {
                if out_of_time() {
                    return Ok(None);
                }
                let probe = self.deliverer.probe(&conn.connection_id, &conn.endpoint).await;
                match probe {
                    Probe::Gone => {
                        let reason = if is_expired(conn.ttl, now) { LeftReason::Expired } else { LeftReason::Gone };
                        self.store.delete_connection(&conn.connection_id, Some(reason)).await?;
                    }
                    // Open: seen now, so the next runs do not ask again until it is idle again.
                    Probe::Open => self.store.mark_seen(&conn.connection_id, now).await?,
                    Probe::Throttled | Probe::Unknown(_) => {}
                }
                Ok::<_, StoreError>(Some((conn.connection_id, probe)))
            })
            .buffer_unordered(SWEEP_PROBES);
        let mut complete = true;
        while let Some(result) = results.next().await {
            let Some((connection_id, probe)) = result? else {
                complete = false;
                continue;
            };
            report.checked += 1;
            match &probe {
                Probe::Gone => report.cleaned += 1,
                Probe::Open => report.still_open += 1,
                Probe::Throttled | Probe::Unknown(_) => {
                    let why = match &probe {
                        Probe::Unknown(why) => why.as_str(),
                        _ => "429: the account is over its quota",
                    };
                    tracing::warn!(%connection_id, reason = %why, "cannot tell whether the connection is open");
                    report.unknown += 1;
                }
            }
        }
        Ok(complete)
    }

    /// Presence never outlives the memberships behind it for long, whatever the stream lost: a
    /// present connection with no live membership in its room is noted as suspect on its user's
    /// item, and one still suspect [`Admin::presence_grace`] later (longer than the stream keeps
    /// retrying a record: a REMOVE on its way has been applied, or gone to the dead-letter
    /// queue, by then) is taken out with an update of its own, one above the connection's mark:
    /// the lost REMOVE, re-driven later, changes nothing, and the connection's next join (a newer
    /// record) counts again. The repair is not announced (the sweeper sends no frames): `who`,
    /// the count and the next snapshot are right; `presence_repaired` counts it.
    async fn reconcile_presence(
        &self,
        shard: u32,
        finish_by: Option<std::time::Instant>,
        report: &mut SweepReport,
    ) -> Result<(), StoreError> {
        let now = self.clock.now();
        let out_of_time = || out_of_time(finish_by);
        // Present users only, through the sweep index: no Scan of the table. The index keys
        // them by room, so each room's memberships are read once, here.
        let page = self.store.present_users(shard).await?;
        // Many small rooms are many Queries: [`SWEEP_PROBES`] at a time.
        let wanted: std::collections::BTreeSet<(&str, &str)> =
            page.iter().map(|p| (p.tenant.as_str(), p.room.as_str())).collect();
        use futures::StreamExt;
        let mut reads = futures::stream::iter(wanted)
            .map(|(tenant, room)| async move {
                if out_of_time() {
                    return Ok(None);
                }
                let members = self.store.room_members(tenant, room, now).await?;
                let members: std::collections::HashSet<(String, String)> =
                    members.into_iter().map(|m| (m.user_id, m.connection_id)).collect();
                Ok::<_, StoreError>(Some(((tenant, room), members)))
            })
            .buffer_unordered(SWEEP_PROBES);
        let mut rooms = std::collections::HashMap::new();
        while let Some(read) = reads.next().await {
            if let Some((room, members)) = read? {
                rooms.insert(room, members);
            }
        }
        drop(reads);
        let mut cut_short = false;
        for p in &page {
            // A room not read (the time ran short): its users wait for the next cycle.
            let Some(room) = rooms.get(&(p.tenant.as_str(), p.room.as_str())).filter(|_| !out_of_time()) else {
                cut_short = true;
                continue;
            };
            let members: std::collections::HashSet<String> =
                p.connections.iter().filter(|c| room.contains(&(p.user_id.clone(), (*c).clone()))).cloned().collect();
            let grace = i64::try_from(self.presence_grace.as_secs()).unwrap_or(i64::MAX);
            let (suspects, repair) = crate::presence::reconcile(p, &members, now, grace);
            report.presence_suspected += suspects.len();
            if suspects != p.suspects {
                let mut next = p.clone();
                next.suspects = suspects;
                next.ver += 1;
                if !self.store.put_presence_suspects(&next).await? {
                    continue; // changed meanwhile: the next sweep looks again
                }
            }
            for connection_id in repair {
                tracing::warn!(tenant = %p.tenant, room = %p.room, user = %p.user_id, %connection_id,
                    "presence outlived its membership: taken out (its REMOVE was lost)");
                let update = crate::presence::PresenceUpdate {
                    tenant: p.tenant.clone(),
                    room: p.room.clone(),
                    user_id: p.user_id.clone(),
                    event_id: format!("repair-{connection_id}"),
                    connection_id: connection_id.clone(),
                    op: crate::presence::PresenceOp::Remove,
                    seq: Some(crate::presence::repair_seq(p.marks.get(&connection_id))),
                    at: now,
                    now,
                    time: now,
                    announce_max_users: 0,
                };
                self.store.apply_presence(&update).await?;
                report.presence_repaired += 1;
            }
        }
        if cut_short {
            tracing::warn!(shard, "the sweep's time ran short within a shard's presence: the rest next cycle");
            report.reconcile_cut_short += 1;
        }
        Ok(())
    }
}
