//! Platform faults: one port of the table that fails some calls, set in the real table's place
//! ([`roomcast::store::parts::Parts`]), for the tests that need one.

use super::*;
use roomcast::store::MembershipStore;
use roomcast::store::parts::Parts;

/// Wraps a real store's memberships: reading the members of `room` fails as if DynamoDB were
/// unavailable, for the next `times` reads. [`UnavailableRoom::table`] is the whole table with it.
pub struct UnavailableRoom {
    pub inner: Arc<dyn Store>,
    pub room: String,
    pub times: AtomicUsize,
}

impl UnavailableRoom {
    /// The real table, its rooms' memberships read through this wrapper.
    pub fn table(self: &Arc<Self>) -> Arc<dyn Store> {
        Parts::of(self.inner.clone()).with_memberships(self.clone()).into()
    }
}

#[async_trait::async_trait]
impl MembershipStore for UnavailableRoom {
    async fn join(&self, m: &roomcast::model::Membership) -> roomcast::store::Result<bool> {
        self.inner.join(m).await
    }
    async fn leave(&self, id: &str, tenant: &str, room: &str) -> roomcast::store::Result<()> {
        self.inner.leave(id, tenant, room).await
    }
    async fn room_members(
        &self,
        tenant: &str,
        room: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Membership>> {
        if room == self.room
            && self.times.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return Err(roomcast::store::StoreError::Unavailable("query: service unavailable (injected)".into()));
        }
        self.inner.room_members(tenant, room, now).await
    }
    async fn bump_roster(&self, tenant: &str, room: &str) -> roomcast::store::Result<()> {
        self.inner.bump_roster(tenant, room).await
    }
    async fn roster_version(&self, tenant: &str, room: &str) -> roomcast::store::Result<Option<u64>> {
        // Never kept: every read of the room asks `room_members`, which fails as set.
        if room == self.room {
            return Ok(None);
        }
        self.inner.roster_version(tenant, room).await
    }
    async fn remove_membership(
        &self,
        tenant: &str,
        room: &str,
        id: &str,
        r: roomcast::model::LeftReason,
    ) -> roomcast::store::Result<()> {
        self.inner.remove_membership(tenant, room, id, r).await
    }
    async fn mark_left(
        &self,
        tenant: &str,
        room: &str,
        id: &str,
        r: roomcast::model::LeftReason,
    ) -> roomcast::store::Result<()> {
        self.inner.mark_left(tenant, room, id, r).await
    }
    async fn settle_join(&self, m: &roomcast::model::Membership, allowed: bool) -> roomcast::store::Result<bool> {
        self.inner.settle_join(m, allowed).await
    }
}
