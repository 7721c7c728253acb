//! A membership record applied to its room's presence ([`crate::presence`]): in a run with the
//! batch's later records of the room when it can be (a join storm's memberships, one write), a
//! room without presence state seeded from its memberships first, and the transition counted.
//! What the room announces is decided by the caller ([`super::audience`]).

use chrono::{DateTime, Utc};

use super::super::batch::record_time;
use super::super::{LEGACY_MEMBERSHIP_AGE_SECONDS, Processor};
use crate::metrics::Metrics;
use crate::model::Membership;
use crate::presence::{PresenceOp, PresenceOutcome, PresenceUpdate, RunRecord};
use crate::protocol::PresenceEvent;
use crate::react::PresenceDecision;
use crate::rules::Lookups;
use crate::store::StoreError;
use aws_lambda_events::dynamodb::EventRecord;

/// Applies `m` (joined: `Add`, left: `Remove`) to its room's presence and says what it did.
pub(super) async fn apply(
    p: &Processor,
    m: &Membership,
    op: PresenceOp,
    record: &EventRecord,
    lookups: &Lookups,
) -> Result<PresenceDecision, StoreError> {
    let max = p.announce_max_users(&m.tenant, lookups).await?;
    let state = p.presence_state();
    let now = p.clock.now();
    if lookups.first_time_in_batch(&m.tenant, &m.room)
        && state.room_presence(&m.tenant, &m.room).await?.is_none()
        && !state.migrate_presence(&m.tenant, &m.room).await?
    {
        seed(p, m, op, max, now).await?;
    }
    let outcome = match lookups.presence_runs().take(&record.event_id) {
        // Applied with an earlier record of the room, in its run.
        Some(outcome) => outcome,
        None => apply_run(p, m, op, record, lookups, (max, now)).await?,
    };
    count(&p.metrics, &outcome);
    let decision = PresenceDecision {
        event: outcome.transition,
        id: record.event_id.clone(),
        users: outcome.users,
        connections: outcome.connections,
        redelivered: outcome.redelivered,
        announce: outcome.transition.is_some() && outcome.announce,
        version: outcome.version,
    };
    tracing::debug!(user = %m.user_id, presence = %decision, "presence");
    Ok(decision)
}

/// Applies the record with the batch's later records of its room (a run: one write), keeping
/// their outcomes for when their turn comes. A later join that is an INSERT waits on the
/// tenant's rules when they decide joins: the run ends before it.
async fn apply_run(
    p: &Processor,
    m: &Membership,
    op: PresenceOp,
    record: &EventRecord,
    lookups: &Lookups,
    (max, now): (u64, DateTime<Utc>),
) -> Result<PresenceOutcome, StoreError> {
    let update = |m: &Membership, op, event_id: &str, seq: Option<String>, time| PresenceUpdate {
        tenant: m.tenant.clone(),
        room: m.room.clone(),
        user_id: m.user_id.clone(),
        connection_id: m.connection_id.clone(),
        op,
        event_id: event_id.to_string(),
        seq,
        at: m.joined_at,
        now,
        time,
        announce_max_users: max,
    };
    let seq = record.change.sequence_number.as_deref().map(crate::model::sequence_key);
    let mut updates = vec![update(m, op, &record.event_id, seq, record_time(record).unwrap_or(now))];
    let runs = lookups.presence_runs();
    let later = runs.after(&m.tenant, &m.room, &record.event_id);
    if !later.is_empty() {
        let inserts_decided = inserts_wait(p, &m.tenant, lookups).await?;
        let run = later.iter().take_while(|r: &&RunRecord| !(r.inserted && inserts_decided));
        updates.extend(run.map(|r| update(&r.membership, r.op, &r.event_id, r.seq.clone(), r.time)));
    }
    let mut outcomes = p.presence_state().apply_presence_run(&updates).await?.into_iter();
    let first =
        outcomes.next().ok_or_else(|| StoreError::Unavailable(format!("presence of {} applied no record", m.room)))?;
    for (update, outcome) in updates[1..].iter().zip(outcomes) {
        Metrics::add(&p.metrics.presence_ahead, 1);
        runs.keep(&update.event_id, outcome);
    }
    Ok(first)
}

/// Whether the tenant's rules decide joins, so that an inserted membership waits for them.
async fn inserts_wait(p: &Processor, tenant: &str, lookups: &Lookups) -> Result<bool, StoreError> {
    let Some(rules) = p.rules.as_deref() else { return Ok(false) };
    p.ensure_loaded(rules, tenant, lookups).await?;
    Ok(rules.authorizes_joins(tenant).await)
}

/// The counters an alarm reads: transitions (not redelivered), unannounced ones, redeliveries.
fn count(metrics: &Metrics, outcome: &PresenceOutcome) {
    if let Some(event) = outcome.transition {
        if !outcome.redelivered {
            let counter = match event {
                PresenceEvent::Joined => &metrics.presence_joined,
                PresenceEvent::Left => &metrics.presence_left,
            };
            Metrics::add(counter, 1);
        }
        if !outcome.announce {
            Metrics::add(&metrics.presence_unannounced, 1);
        }
    }
    if outcome.redelivered {
        Metrics::add(&metrics.presence_redelivered, 1);
    }
}

/// A room with memberships but no presence state yet (written before presence was state, or
/// by a processor of an older version during a rolling deploy) starts from its live
/// memberships, announcing nothing. Only memberships a minute older than the record being
/// handled are taken: in a room that is simply new, the memberships written just after this
/// one are later records of the same batch, and must be announced when their turn comes.
/// The connection of a REMOVE is put in the seed (its INSERT was never applied).
async fn seed(p: &Processor, m: &Membership, op: PresenceOp, max: u64, now: DateTime<Utc>) -> Result<(), StoreError> {
    let reference = if op == PresenceOp::Add { m.joined_at } else { now };
    let legacy = reference - chrono::Duration::seconds(LEGACY_MEMBERSHIP_AGE_SECONDS);
    let mut members: Vec<(String, String, DateTime<Utc>)> = p
        .room_members(&m.tenant, &m.room, true)
        .await?
        .into_iter()
        .filter(|member| member.connection_id != m.connection_id && member.joined_at < legacy)
        .map(|member| (member.user_id, member.connection_id, member.joined_at))
        .collect();
    if op == PresenceOp::Remove {
        members.push((m.user_id.clone(), m.connection_id.clone(), m.joined_at));
    }
    if !members.is_empty() {
        tracing::info!(tenant = %m.tenant, room = %m.room, connections = members.len(), "seeding presence from the room's memberships");
    }
    for (user_id, connection_id, at) in members {
        let seed = PresenceUpdate {
            tenant: m.tenant.clone(),
            room: m.room.clone(),
            event_id: format!("seed-{connection_id}"),
            user_id,
            connection_id,
            op: PresenceOp::Add,
            seq: None,
            at,
            now,
            time: now,
            announce_max_users: max,
        };
        p.presence_state().apply_presence(&seed).await?;
    }
    Ok(())
}
