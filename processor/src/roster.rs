//! Who is in a room, kept by each processor container so that a steady room's message costs one
//! small read instead of a read of every membership.
//!
//! Every write that adds, removes or changes a membership of a room (connect, join, leave, the
//! processor settling a join or removing a membership) bumps the room's roster version,
//! `ROSTER#{tenant}#{room}` / `VERSION` ([`crate::model::roster_pk`]), right after it and before
//! it is acknowledged ([`crate::store::MembershipStore::bump_roster`]). A container reads that version (strongly
//! consistent, one read unit) for each record that needs the room's members, and serves the
//! members it read last when the version has not moved. It reads the room in full when:
//!
//! * the version moved, or the room has none yet (no membership written since versions exist);
//! * a kept membership's TTL has passed: a TTL refresh (`ping`) bumps nothing, so the kept TTLs
//!   may be older than the table's, and the first to run out is when the copy may disagree with
//!   what the table would answer (expired members are left out of every read);
//! * the copy is older than [`MAX_AGE`] by the processor's clock: the bound on what a lost bump
//!   (a writer that died between its write and its bump, with no retry) or a writer of an older
//!   release (during a deploy) can leave wrong.
//!
//! Why this holds whatever order the stream delivers records in: the version moves before a join
//! or leave is acknowledged, so any message written after that moment is processed after it, and
//! whichever container processes it reads the moved version. The version is read before the
//! members: a change landing between the two is in the members read, and has moved the version
//! past the one they are kept under, so the next record reads again. A member whose join was
//! acknowledged is served from the next message on; one whose leave was, never again — in every
//! container, since each reads the version itself. The processor's redelivered settlements and
//! removals bump again. A bump lost between a handler's write and its answer (an error or a crash
//! there) is bounded by [`MAX_AGE`]: a client's repeated `join` or `leave` bumps nothing, so that
//! no client can make every container read a big room again at will.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::metrics::Metrics;
use crate::model::{self, Membership};
use crate::store::{Result, Store};

/// A kept roster is read again after this long, whatever its version says: the bound on what a
/// processor that does not bump versions (an older one, during a deploy) can leave wrong.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// The most a container keeps, over all rooms, counted in memberships (a room with none counts
/// one): about 100 MB at ~500 bytes each. Beyond, the rooms used longest ago are dropped; a room
/// bigger than this is read for every record and never kept.
pub const MAX_MEMBERS: usize = 200_000;

/// How a room's members were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Kept from an earlier read, the version unchanged.
    Kept,
    /// Read from the table and kept under its version.
    Read,
    /// Read from the table; the room has no version yet, so nothing is kept.
    Unversioned,
}

#[derive(Clone)]
struct Entry {
    version: u64,
    /// The room's live members, without joins that wait for the tenant's rules.
    members: Arc<Vec<Membership>>,
    /// The earliest TTL among `members`.
    first_expiry: Option<i64>,
    read_at: DateTime<Utc>,
    /// When it was last served (a tick of [`Kept::tick`]): the eviction order.
    used: u64,
}

impl Entry {
    fn weight(&self) -> usize {
        self.members.len().max(1)
    }
}

#[derive(Default)]
struct Kept {
    entries: HashMap<String, Entry>,
    /// `(used, room)` of every entry, least recently used first.
    order: BTreeSet<(u64, String)>,
    /// The entries' weights summed.
    total: usize,
    tick: u64,
}

impl Kept {
    fn remove(&mut self, key: &str) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&(entry.used, key.to_string()));
            self.total -= entry.weight();
        }
    }

    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.entries.get_mut(key) {
            self.order.remove(&(entry.used, key.to_string()));
            entry.used = tick;
            self.order.insert((tick, key.to_string()));
        }
    }
}

/// The rosters one container keeps.
pub struct Rosters {
    kept: Mutex<Kept>,
    max_members: usize,
    max_age: chrono::Duration,
}

impl Default for Rosters {
    fn default() -> Self {
        Rosters::new(MAX_MEMBERS, MAX_AGE)
    }
}

impl Rosters {
    pub fn new(max_members: usize, max_age: Duration) -> Rosters {
        let max_age = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        Rosters { kept: Mutex::new(Kept::default()), max_members, max_age }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live memberships of the room not waiting for the tenant's rules, ordered by
    /// connection id, as [`crate::store::MembershipStore::room_members`] would answer `now`; counted in `roster_kept` /
    /// `roster_reads`.
    pub async fn members(
        &self,
        store: &dyn Store,
        tenant: &str,
        room: &str,
        now: DateTime<Utc>,
        metrics: &Metrics,
    ) -> Result<(Arc<Vec<Membership>>, Found)> {
        let key = model::room_pk(tenant, room);
        let version = store.roster_version(tenant, room).await?;
        if let Some(version) = version {
            let mut kept = self.lock();
            let fresh = kept.entries.get(&key).filter(|entry| {
                entry.version == version
                    && now - entry.read_at < self.max_age
                    && entry.first_expiry.is_none_or(|ttl| !model::is_expired(ttl, now))
            });
            if let Some(entry) = fresh {
                let members = entry.members.clone();
                kept.touch(&key);
                Metrics::add(&metrics.roster_kept, 1);
                return Ok((members, Found::Kept));
            }
        }
        let mut members = store.room_members(tenant, room, now).await?;
        members.retain(|m| m.pending != Some(true));
        let members = Arc::new(members);
        Metrics::add(&metrics.roster_reads, 1);
        let Some(version) = version else {
            return Ok((members, Found::Unversioned));
        };
        let entry = Entry {
            version,
            first_expiry: members.iter().map(|m| m.ttl).min(),
            members: members.clone(),
            read_at: now,
            used: 0,
        };
        self.keep(key, entry);
        Ok((members, Found::Read))
    }

    fn keep(&self, key: String, entry: Entry) {
        let mut kept = self.lock();
        // A slower read of an older version never replaces a newer one.
        if kept.entries.get(&key).is_some_and(|other| other.version > entry.version) {
            return;
        }
        kept.remove(&key);
        if entry.weight() > self.max_members {
            return;
        }
        kept.total += entry.weight();
        kept.entries.insert(key.clone(), entry);
        kept.order.insert((0, key.clone()));
        kept.touch(&key);
        while kept.total > self.max_members {
            let Some((_, oldest)) = kept.order.first().cloned() else {
                break;
            };
            kept.remove(&oldest);
        }
    }

    /// Rooms kept, and their weight (memberships, a room with none counting one).
    pub fn size(&self) -> (usize, usize) {
        let kept = self.lock();
        (kept.entries.len(), kept.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Clock, Connection, JoinReason, LeftReason, ManualClock, Name, NewConnection};
    use crate::store::ConnectionStore;
    use crate::store::MembershipStore;
    use crate::store::memory::MemoryStore;

    async fn setup() -> (Arc<MemoryStore>, Arc<ManualClock>, Metrics) {
        let clock = ManualClock::at("2026-01-01T00:00:00Z".parse().unwrap());
        (MemoryStore::new(clock.clone()), clock, Metrics::default())
    }

    async fn connect(store: &MemoryStore, clock: &ManualClock, id: &str, rooms: &[&str]) -> Connection {
        let tenant = Name::parse("tenant", "acme").unwrap();
        let conn = Connection::new(NewConnection {
            connection_id: id,
            tenant: &tenant,
            user_id: &format!("user-{id}"),
            connection_type: None,
            deployment_id: None,
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            endpoint: "http://127.0.0.1:1".into(),
            now: clock.now(),
            ttl_seconds: 7200,
        });
        let members: Vec<Membership> =
            rooms.iter().map(|r| conn.membership(r, JoinReason::Connect, clock.now())).collect();
        store.put_connection(&conn, &members).await.unwrap();
        conn
    }

    async fn found(rosters: &Rosters, store: &MemoryStore, room: &str, now: DateTime<Utc>) -> Found {
        rosters.members(store, "acme", room, now, &Metrics::default()).await.unwrap().1
    }

    fn ids(members: &[Membership]) -> Vec<&str> {
        members.iter().map(|m| m.connection_id.as_str()).collect()
    }

    #[tokio::test]
    async fn a_steady_room_is_read_once_and_every_change_is_seen() {
        let (store, clock, metrics) = setup().await;
        let rosters = Rosters::default();
        let a = connect(&store, &clock, "a", &["lobby"]).await;
        let (first, found) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert_eq!((ids(&first), found), (vec!["a"], Found::Read));
        for _ in 0..3 {
            let (again, found) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
            assert_eq!((ids(&again), found), (vec!["a"], Found::Kept));
        }
        // A join elsewhere moves the version: the next read sees the new member.
        let b = connect(&store, &clock, "b", &["lobby"]).await;
        let (after_join, found) =
            rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert_eq!((ids(&after_join), found), (vec!["a", "b"], Found::Read));
        // A leave, and the processor's removal of a gone connection's membership.
        store.leave(&a.connection_id, "acme", "lobby").await.unwrap();
        let (after_leave, _) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert_eq!(ids(&after_leave), vec!["b"]);
        store.remove_membership("acme", "lobby", &b.connection_id, LeftReason::Gone).await.unwrap();
        let (empty, _) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert!(empty.is_empty());
        let counts = metrics.snapshot();
        assert_eq!((counts.roster_reads, counts.roster_kept), (4, 3));
    }

    #[tokio::test]
    async fn a_refreshed_ttl_bumps_nothing_and_the_first_expiry_rereads() {
        let (store, clock, metrics) = setup().await;
        // Copies never too old here: what makes the reads below is the TTL alone.
        let rosters = Rosters::new(MAX_MEMBERS, Duration::from_secs(1_000_000));
        let a = connect(&store, &clock, "a", &["lobby"]).await;
        let (_, found) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert_eq!(found, Found::Read);
        let ttl = a.ttl + 3600;
        store.touch(&a, clock.now(), ttl).await.unwrap();
        let (_, found) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert_eq!(found, Found::Kept, "a TTL refresh must not cost the room a read");
        // Past the TTL the copy holds, the table is asked: the member is still there (refreshed).
        clock.set(chrono::DateTime::from_timestamp(a.ttl, 0).unwrap());
        let (members, found) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert_eq!((ids(&members), found), (vec!["a"], Found::Read));
        // Past the refreshed TTL too: the member is gone from the answer, as the table's own.
        clock.set(chrono::DateTime::from_timestamp(ttl, 0).unwrap());
        let (members, _) = rosters.members(store.as_ref(), "acme", "lobby", clock.now(), &metrics).await.unwrap();
        assert!(members.is_empty());
    }

    #[tokio::test]
    async fn an_old_copy_is_read_again_whatever_its_version() {
        let (store, clock, _) = setup().await;
        connect(&store, &clock, "a", &["one"]).await;
        let rosters = Rosters::default();
        assert_eq!(found(&rosters, &store, "one", clock.now()).await, Found::Read);
        let almost = clock.now() + chrono::Duration::seconds(59);
        assert_eq!(found(&rosters, &store, "one", almost).await, Found::Kept);
        let past = clock.now() + chrono::Duration::seconds(60);
        assert_eq!(found(&rosters, &store, "one", past).await, Found::Read, "a copy past MAX_AGE is not served");
    }

    #[tokio::test]
    async fn the_cap_drops_the_room_used_longest_ago_and_never_keeps_a_room_bigger_than_it() {
        let (store, clock, _) = setup().await;
        connect(&store, &clock, "a", &["one", "two", "three"]).await;
        connect(&store, &clock, "b", &["three"]).await;
        let rosters = Rosters::new(2, MAX_AGE);
        let get = |room: &'static str| found(&rosters, &store, room, clock.now());
        assert_eq!(get("one").await, Found::Read);
        assert_eq!(get("two").await, Found::Read);
        // "one" is served again, so "two" is the one used longest ago when "one" must make room.
        assert_eq!(get("one").await, Found::Kept);
        assert_eq!(get("empty").await, Found::Unversioned);
        store.bump_roster("acme", "four").await.unwrap();
        assert_eq!(get("four").await, Found::Read, "an empty room weighs one");
        assert_eq!(rosters.size(), (2, 2));
        assert_eq!(get("one").await, Found::Kept);
        assert_eq!(get("two").await, Found::Read, "dropped for the empty room");
        // A room of two fits; it grows past the cap: read every time, and its old copy is gone.
        assert_eq!(get("three").await, Found::Read);
        assert_eq!(rosters.size(), (1, 2));
        connect(&store, &clock, "c", &["three"]).await;
        assert_eq!(get("three").await, Found::Read);
        assert_eq!(get("three").await, Found::Read);
        assert_eq!(rosters.size(), (0, 0));
    }

    #[tokio::test]
    async fn a_join_waiting_for_the_rules_is_not_kept_as_a_member() {
        let (store, clock, metrics) = setup().await;
        let a = connect(&store, &clock, "a", &["lobby"]).await;
        let mut waiting = a.membership("vip", JoinReason::Join, clock.now());
        waiting.pending = Some(true);
        store.join(&waiting).await.unwrap();
        let rosters = Rosters::default();
        let (members, _) = rosters.members(store.as_ref(), "acme", "vip", clock.now(), &metrics).await.unwrap();
        assert!(members.is_empty(), "{members:?}");
        store.settle_join(&waiting, true).await.unwrap();
        let (members, _) = rosters.members(store.as_ref(), "acme", "vip", clock.now(), &metrics).await.unwrap();
        assert_eq!(ids(&members), vec!["a"]);
    }

    #[tokio::test]
    async fn a_room_without_a_version_is_always_read() {
        let (store, clock, metrics) = setup().await;
        let rosters = Rosters::default();
        for _ in 0..2 {
            let (members, found) =
                rosters.members(store.as_ref(), "acme", "empty", clock.now(), &metrics).await.unwrap();
            assert_eq!((members.len(), found), (0, Found::Unversioned));
        }
    }
}
