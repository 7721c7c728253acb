//! A big fan-out's progress, so a redelivered record resumes where it stopped.

use super::*;

// Fan-out progress: `FANOUT#{key}` / `PROGRESS` says how far a big fan-out got, so that a record
// redelivered after a cut-off (the invocation's deadline, a crash, a later record's failure)
// resumes where it stopped instead of serving the room again from its first member.

pub const FANOUT_PROGRESS_SK: &str = "PROGRESS";

/// How long progress is kept: longer than Lambda retries a stream record before giving up on it.
pub const FANOUT_PROGRESS_TTL_SECONDS: i64 = 24 * 3600;

pub fn fanout_pk(key: &str) -> String {
    format!("FANOUT#{key}")
}

/// How far one frame's fan-out got. Its recipients are served in connection-id order: every one
/// whose id sorts at or below `through` was served or settled (delivered, gone, given up on,
/// set aside as young), except those in `pending`, still being sent when this was written.
/// Recipients above `through` were not started. `complete`: every recipient was settled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FanoutProgress {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    #[serde(default)]
    pub through: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    #[serde(default)]
    pub complete: bool,
    pub ttl: i64,
}

impl FanoutProgress {
    pub fn new(key: &str, through: String, pending: Vec<String>, complete: bool, now: DateTime<Utc>) -> FanoutProgress {
        FanoutProgress {
            pk: fanout_pk(key),
            sk: FANOUT_PROGRESS_SK.into(),
            record_type: "fanout".into(),
            through,
            pending,
            complete,
            ttl: expiry(now, FANOUT_PROGRESS_TTL_SECONDS),
        }
    }

    /// Whether `connection_id` was already served or settled.
    pub fn settled(&self, connection_id: &str) -> bool {
        self.settled_lookup()(connection_id)
    }

    /// [`FanoutProgress::settled`] for many connections: the pending ids looked up in a set.
    pub fn settled_lookup(&self) -> impl Fn(&str) -> bool + '_ {
        let pending: std::collections::HashSet<&str> = self.pending.iter().map(String::as_str).collect();
        move |id| self.complete || (id <= self.through.as_str() && !pending.contains(id))
    }
}
