//! What a reconnect missed: a `?since=` message id's room read from just before it, within a
//! budget — for a welcome ([`super::connection`]) and for a join the tenant's rules allowed
//! ([`super::membership`]).

use super::{MAX_RECOVERED, MAX_RECOVERED_AT_CONNECT, Processor};
use crate::protocol::ChatMessage;
use crate::store::StoreError;

impl Processor {
    /// The messages after `since` in a room (from a margin before it: a client keeps one copy
    /// per id), for a connection that reconnected with `?since=`: at most `budget` of them, or
    /// why they cannot all be given.
    pub(super) async fn recover(
        &self,
        tenant: &str,
        room: &str,
        since: &str,
        budget: usize,
        viewer: &str,
    ) -> Result<Result<Vec<ChatMessage>, String>, StoreError> {
        let now = self.clock.now();
        let Some(sk) = crate::model::message_sk_of_id(since) else {
            return Ok(Err("that is not a message id".into()));
        };
        let Some(seen) = self.store.message(tenant, room, &sk, now).await? else {
            return Ok(Err("that message is no longer in history: reload the room".into()));
        };
        if budget == 0 {
            return Ok(Err(format!(
                "more than {MAX_RECOVERED_AT_CONNECT} messages to recover at connect: ask `recover` for this room"
            )));
        }
        let from = crate::store::recovery_start(&seen);
        let missed: Vec<_> = self
            .store
            .history(tenant, room, &from, budget.min(MAX_RECOVERED) + 2, now, Some(viewer))
            .await?
            .into_iter()
            .filter(|m| m.id != seen.id)
            .collect();
        if missed.len() > budget.min(MAX_RECOVERED) {
            return Ok(Err(format!(
                "more than {} messages were missed: reload the room, or ask `recover`",
                budget.min(MAX_RECOVERED)
            )));
        }
        Ok(Ok(missed.iter().map(ChatMessage::from).collect()))
    }
}
