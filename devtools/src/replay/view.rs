//! `--membership-from-stream`: who is in each room, as the input's own membership records say,
//! so that a capture replays with no table. The view is updated with each record before that
//! record is processed — as the processor reads the table after the change was written.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::model::Membership;
use crate::store::{Result, Rooms};
use crate::stream::{Change, Record};

#[derive(Debug, Default)]
pub struct StreamRooms {
    /// (tenant, room) → connection id → membership.
    rooms: Mutex<BTreeMap<(String, String), BTreeMap<String, Membership>>>,
}

impl StreamRooms {
    /// Applies one change: a membership written joins its room, a membership removed leaves it.
    pub fn observe(&self, change: &Change) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        match change {
            Change::Inserted(Record::Membership(m)) | Change::Modified { new: Record::Membership(m), .. } => {
                rooms.entry((m.tenant.clone(), m.room.clone())).or_default().insert(m.connection_id.clone(), m.clone());
            }
            Change::Removed { old: Record::Membership(m), .. } => {
                if let Some(room) = rooms.get_mut(&(m.tenant.clone(), m.room.clone())) {
                    room.remove(&m.connection_id);
                }
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Rooms for StreamRooms {
    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        Ok(rooms
            .get(&(tenant.to_string(), room.to_string()))
            .map(|members| {
                members.values().filter(|m| !crate::model::is_expired(m.ttl, now)).cloned().collect::<Vec<_>>()
            })
            .unwrap_or_default())
    }
}
