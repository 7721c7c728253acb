//! A record's effects performed: sent by the deliverer within the batch's window, or, for a big
//! room, handed to the fan-out stage ([`crate::deliver::stage`]) so that every frame of the room
//! goes through the same lane, in order.

use std::time::{Duration, Instant};

use super::Processor;
use crate::deliver::Window;
use crate::metrics::Metrics;
use crate::react::Effect;
use crate::rules::Mode;
use crate::store::StoreError;

/// How long a room whose messages were staged goes on staging them, whatever its size: as long
/// as a queued job can live (five receives of the fan-out queue's 360 s visibility).
pub const STAGED_ROOM_MEMORY: Duration = Duration::from_secs(30 * 60);

/// The most rooms a container remembers as staged; past it, the oldest are forgotten.
const STAGED_ROOMS_MAX: usize = 100_000;

impl Processor {
    /// Performs a record's effects in order: big frames handed to the fan-out stage, if there
    /// is one, the rest here. The decision is the room's where it can be: every frame of a
    /// message or signal to a room of `hand_off.recipients` members or more is staged, however
    /// few it goes to (a plugin's narrowed route, a follow-up frame), so that a member of a big
    /// room gets all its frames through the same lane, in order. Other records' frames are
    /// staged when they are that big themselves.
    pub(super) async fn perform(
        &self,
        effects: &[Effect],
        window: &Window,
        event_id: &str,
        room: Option<(&str, &str)>,
        room_size: Option<usize>,
    ) -> Result<Vec<(String, crate::deliver::Outcome)>, StoreError> {
        let stage = self.hand_off.as_ref().filter(|_| self.mode == Mode::Execute).zip(room);
        let Some((hand_off, (tenant, room))) = stage else {
            return self.deliverer.apply(effects, window, Some(event_id)).await;
        };
        // A big room now, or one this container staged lately (it may have shrunk since).
        let big_room = room_size.is_some() && self.staged_lately(tenant, room, hand_off.recipients, room_size);
        let mut outcomes = Vec::new();
        let mut start = 0;
        // Staged frames are numbered among themselves: effects before them (a plugin's mark)
        // may differ between attempts, and the jobs' ids must not.
        let mut staged = 0;
        // Each stretch of effects between two hand-offs keeps its big frames' progress under a
        // key of its own (the first stretch under the record's, as without a stage).
        let key = |start: usize| if start == 0 { event_id.to_string() } else { format!("{event_id}@{start}") };
        for (i, effect) in effects.iter().enumerate() {
            let Effect::Send { payload, recipients } = effect else { continue };
            if recipients.is_empty() || (!big_room && recipients.len() < hand_off.recipients) {
                continue;
            }
            outcomes.extend(self.deliverer.apply(&effects[start..i], window, Some(&key(start))).await?);
            let jobs = crate::deliver::stage::jobs(tenant, room, &format!("{event_id}#{staged}"), payload, recipients);
            staged += 1;
            let count = jobs.len();
            hand_off.stage.hand_off(jobs).await?;
            Metrics::add(&self.metrics.handed_off, recipients.len() as u64);
            tracing::info!(recipients = recipients.len(), jobs = count, "fan-out handed to the stage");
            outcomes.extend(recipients.iter().map(|r| (r.connection_id.clone(), crate::deliver::Outcome::Queued)));
            start = i + 1;
        }
        outcomes.extend(self.deliverer.apply(&effects[start..], window, Some(&key(start))).await?);
        outcomes.sort();
        Ok(outcomes)
    }

    /// Whether this container staged the room's messages within [`STAGED_ROOM_MEMORY`], and, if
    /// the room is big now (`room_size` at the threshold or more), remembers that it is staging.
    fn staged_lately(&self, tenant: &str, room: &str, threshold: usize, room_size: Option<usize>) -> bool {
        let key = crate::model::room_pk(tenant, room);
        let mut staged = self.staged_rooms.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if room_size.is_some_and(|n| n >= threshold) {
            if staged.len() >= STAGED_ROOMS_MAX && !staged.contains_key(&key) {
                staged.retain(|_, at| now.duration_since(*at) < STAGED_ROOM_MEMORY);
                if staged.len() >= STAGED_ROOMS_MAX
                    && let Some(oldest) = staged.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone())
                {
                    staged.remove(&oldest);
                }
            }
            staged.insert(key, now);
            return true;
        }
        match staged.get(&key) {
            Some(at) if now.duration_since(*at) < STAGED_ROOM_MEMORY => true,
            Some(_) => {
                staged.remove(&key);
                false
            }
            None => false,
        }
    }
}
