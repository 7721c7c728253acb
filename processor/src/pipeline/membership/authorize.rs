//! Who may join: a membership that waited for the tenant's rules (or, from a connection opened
//! before its plugin decided joins, one that did not wait) is put to `authorize-join`, and the
//! answer settles it — allowed, it loses `pending` (its MODIFY makes the user present and
//! acknowledges the join); denied, it is deleted and the joiner gets `join_denied`. A dry run
//! writes nothing.

use super::super::Processor;
use crate::metrics::Metrics;
use crate::model::Membership;
use crate::react::JoinOutcome;
use crate::rules::{CallRecord, JoinInput, JoinVerdict, Lookups, Mode, RecordAt};
use crate::store::StoreError;

/// The tenant's answer about `m` (`waited`: written pending), settled on the table. `None`: no
/// decision to tell (allowed without waiting, nothing decides, or already decided).
pub(super) async fn authorize(
    p: &Processor,
    m: &Membership,
    waited: bool,
    sequence: &str,
    lookups: &Lookups,
) -> Result<(Option<JoinOutcome>, Vec<CallRecord>), StoreError> {
    let Some(rules) = p.rules.as_deref() else {
        // No rules here at all (a processor without plugins): nothing decides; allow.
        if waited && p.mode == Mode::Execute {
            p.store.settle_join(m, true).await?;
        }
        return Ok((None, Vec::new()));
    };
    p.ensure_loaded(rules, &m.tenant, lookups).await?;
    if !waited && !rules.authorizes_joins(&m.tenant).await {
        return Ok((None, Vec::new()));
    }
    let Some(claims) = claims(p, m, waited).await? else { return Ok((None, Vec::new())) };
    let join = JoinInput {
        connection_id: m.connection_id.clone(),
        tenant: m.tenant.clone(),
        user_id: m.user_id.clone(),
        room: m.room.clone(),
        claims,
    };
    let at = RecordAt { time_ms: m.joined_at.timestamp_millis().max(0) as u64, sequence: sequence.into() };
    let (verdict, calls) = match rules.authorize_join(&join, &at).await {
        Some((verdict, call)) => (verdict, vec![call]),
        None => (JoinVerdict::Allow, Vec::new()),
    };
    let allowed = verdict == JoinVerdict::Allow;
    // Applied only to the membership it was made for: a redelivered or stale record's
    // decision changes nothing and tells the client nothing.
    if p.mode == Mode::Execute && !p.store.settle_join(m, allowed).await? {
        tracing::info!(user = %m.user_id, "join already decided (a redelivered or stale record)");
        return Ok((None, calls));
    }
    Metrics::add(if allowed { &p.metrics.joins_allowed } else { &p.metrics.joins_denied }, 1);
    tracing::info!(user = %m.user_id, allowed, waited, "join decided");
    let outcome = match verdict {
        JoinVerdict::Allow => None,
        JoinVerdict::Deny(reason) => Some(JoinOutcome::Denied(reason)),
    };
    Ok((outcome, calls))
}

/// The joiner's token claims: a pending membership carries them; one that did not wait reads
/// them from its connection. `None`: the connection is gone already (its memberships are being
/// removed; nothing to decide).
async fn claims(p: &Processor, m: &Membership, waited: bool) -> Result<Option<Vec<(String, String)>>, StoreError> {
    let claims = match waited {
        true => m.claims.clone(),
        false => match p.store.get_connection(&m.connection_id, p.clock.now()).await? {
            Some(conn) => conn.claims,
            None => return Ok(None),
        },
    };
    Ok(Some(claims.into_iter().collect()))
}
