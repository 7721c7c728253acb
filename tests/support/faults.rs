//! Platform faults: a store that fails some reads, for the tests that need one.

use super::*;

/// Wraps a real store; reading the members of `room` fails as if DynamoDB were unavailable, for
/// the next `times` reads.
pub struct UnavailableRoom {
    pub inner: Arc<dyn Store>,
    pub room: String,
    pub times: AtomicUsize,
}

#[async_trait::async_trait]
impl Store for UnavailableRoom {
    async fn put_connection(
        &self,
        c: &roomcast::model::Connection,
        m: &[roomcast::model::Membership],
    ) -> roomcast::store::Result<()> {
        self.inner.put_connection(c, m).await
    }
    async fn get_connection(
        &self,
        id: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Option<roomcast::model::Connection>> {
        self.inner.get_connection(id, now).await
    }
    async fn delete_connection(
        &self,
        id: &str,
        r: Option<roomcast::model::LeftReason>,
    ) -> roomcast::store::Result<Option<roomcast::model::Connection>> {
        self.inner.delete_connection(id, r).await
    }
    async fn join(&self, m: &roomcast::model::Membership) -> roomcast::store::Result<bool> {
        self.inner.join(m).await
    }
    async fn leave(&self, id: &str, tenant: &str, room: &str) -> roomcast::store::Result<()> {
        self.inner.leave(id, tenant, room).await
    }
    async fn touch(
        &self,
        c: &roomcast::model::Connection,
        now: chrono::DateTime<chrono::Utc>,
        ttl: i64,
    ) -> roomcast::store::Result<()> {
        self.inner.touch(c, now, ttl).await
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
    async fn tenant_identity(
        &self,
        tenant: &str,
    ) -> roomcast::store::Result<Option<roomcast::identity::TenantIdentity>> {
        self.inner.tenant_identity(tenant).await
    }
    async fn put_tenant_identity(&self, identity: &roomcast::identity::TenantIdentity) -> roomcast::store::Result<()> {
        self.inner.put_tenant_identity(identity).await
    }
    async fn stale_connections(
        &self,
        shard: u32,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Connection>> {
        self.inner.stale_connections(shard, cutoff).await
    }
    async fn present_users(&self, shard: u32) -> roomcast::store::Result<Vec<roomcast::model::Presence>> {
        self.inner.present_users(shard).await
    }
    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> roomcast::store::Result<Option<u32>> {
        self.inner.take_sweep_lease(now, until, owner).await
    }
    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> roomcast::store::Result<bool> {
        self.inner.sweep_progress(owner, next_shard, release).await
    }
    async fn mark_seen(&self, connection_id: &str, now: chrono::DateTime<chrono::Utc>) -> roomcast::store::Result<()> {
        self.inner.mark_seen(connection_id, now).await
    }
    async fn count_in_window(&self, key: &str, window: i64) -> roomcast::store::Result<u64> {
        self.inner.count_in_window(key, window).await
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
    async fn put_message(&self, m: &roomcast::model::Message) -> roomcast::store::Result<()> {
        self.inner.put_message(m).await
    }
    async fn put_signal(&self, s: &roomcast::model::Signal) -> roomcast::store::Result<()> {
        self.inner.put_signal(s).await
    }
    async fn migrate_presence(&self, tenant: &str, room: &str) -> roomcast::store::Result<bool> {
        self.inner.migrate_presence(tenant, room).await
    }
    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> roomcast::store::Result<()> {
        self.inner.unannounce(tenant, room, user_id).await
    }
    async fn apply_presence(
        &self,
        update: &roomcast::presence::PresenceUpdate,
    ) -> roomcast::store::Result<roomcast::presence::PresenceOutcome> {
        self.inner.apply_presence(update).await
    }
    async fn who(
        &self,
        tenant: &str,
        room: &str,
        limit: usize,
        after: Option<&str>,
    ) -> roomcast::store::Result<roomcast::presence::WhoPage> {
        self.inner.who(tenant, room, limit, after).await
    }
    async fn presence(
        &self,
        tenant: &str,
        room: &str,
        user: &str,
    ) -> roomcast::store::Result<Option<roomcast::model::Presence>> {
        self.inner.presence(tenant, room, user).await
    }
    async fn room_presence(
        &self,
        tenant: &str,
        room: &str,
    ) -> roomcast::store::Result<Option<roomcast::model::RoomPresence>> {
        self.inner.room_presence(tenant, room).await
    }
    async fn tenant_settings(&self, tenant: &str) -> roomcast::store::Result<Option<roomcast::model::TenantSettings>> {
        self.inner.tenant_settings(tenant).await
    }
    async fn put_tenant_settings(&self, settings: &roomcast::model::TenantSettings) -> roomcast::store::Result<()> {
        self.inner.put_tenant_settings(settings).await
    }
    async fn fanout_progress(&self, key: &str) -> roomcast::store::Result<Option<roomcast::model::FanoutProgress>> {
        self.inner.fanout_progress(key).await
    }
    async fn put_fanout_progress(&self, progress: &roomcast::model::FanoutProgress) -> roomcast::store::Result<()> {
        self.inner.put_fanout_progress(progress).await
    }
    async fn plugin_config(&self, tenant: &str) -> roomcast::store::Result<Option<roomcast::model::PluginConfig>> {
        self.inner.plugin_config(tenant).await
    }
    async fn put_plugin_config(&self, config: &roomcast::model::PluginConfig) -> roomcast::store::Result<()> {
        self.inner.put_plugin_config(config).await
    }
    async fn settle_join(&self, m: &roomcast::model::Membership, allowed: bool) -> roomcast::store::Result<bool> {
        self.inner.settle_join(m, allowed).await
    }
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> roomcast::store::Result<()> {
        self.inner.set_authorizes_joins(tenant, version, authorizes).await
    }
    async fn user_connections(
        &self,
        tenant: &str,
        user: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Connection>> {
        self.inner.user_connections(tenant, user, now).await
    }
    async fn scan_connections(
        &self,
        limit: usize,
        after: Option<&str>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Connection>> {
        self.inner.scan_connections(limit, after).await
    }
    async fn scan_presence(
        &self,
        limit: usize,
        after: Option<(String, String)>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Presence>> {
        self.inner.scan_presence(limit, after).await
    }
    async fn put_presence_suspects(&self, p: &roomcast::model::Presence) -> roomcast::store::Result<bool> {
        self.inner.put_presence_suspects(p).await
    }
    async fn set_status(&self, id: &str, status: &str) -> roomcast::store::Result<Option<roomcast::model::Connection>> {
        self.inner.set_status(id, status).await
    }
    async fn put_plugin(
        &self,
        m: &roomcast::model::PluginMeta,
        c: &[roomcast::model::PluginChunk],
    ) -> roomcast::store::Result<()> {
        self.inner.put_plugin(m, c).await
    }
    async fn plugin_bytes(
        &self,
        tenant: &str,
        version: &str,
        chunks: usize,
    ) -> roomcast::store::Result<Option<Vec<u8>>> {
        self.inner.plugin_bytes(tenant, version, chunks).await
    }
    async fn plugin(
        &self,
        tenant: &str,
        version: &str,
    ) -> roomcast::store::Result<Option<roomcast::model::PluginMeta>> {
        self.inner.plugin(tenant, version).await
    }
    async fn plugins(&self, tenant: &str) -> roomcast::store::Result<Vec<roomcast::model::PluginMeta>> {
        self.inner.plugins(tenant).await
    }
    async fn set_plugin_status(
        &self,
        tenant: &str,
        version: &str,
        status: roomcast::model::PluginStatus,
        reason: Option<&str>,
    ) -> roomcast::store::Result<()> {
        self.inner.set_plugin_status(tenant, version, status, reason).await
    }
    async fn active_plugin(&self, tenant: &str) -> roomcast::store::Result<Option<roomcast::model::PluginActive>> {
        self.inner.active_plugin(tenant).await
    }
    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> roomcast::store::Result<()> {
        self.inner.set_active_plugin(tenant, version).await
    }
    async fn history_page(
        &self,
        tenant: &str,
        room: &str,
        from: &roomcast::store::HistoryFrom,
        limit: usize,
        now: chrono::DateTime<chrono::Utc>,
        viewer: Option<&str>,
        max_bytes: usize,
    ) -> roomcast::store::Result<Vec<roomcast::model::Message>> {
        self.inner.history_page(tenant, room, from, limit, now, viewer, max_bytes).await
    }
    async fn put_message_once(
        &self,
        m: &roomcast::model::Message,
        record: &roomcast::model::IdempotencyRecord,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<roomcast::model::Message> {
        self.inner.put_message_once(m, record, now).await
    }
    async fn mark_message(
        &self,
        tenant: &str,
        room: &str,
        sk: &str,
        verdict: &roomcast::react::Verdict,
    ) -> roomcast::store::Result<()> {
        self.inner.mark_message(tenant, room, sk, verdict).await
    }
    async fn message(
        &self,
        tenant: &str,
        room: &str,
        sk: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Option<roomcast::model::Message>> {
        self.inner.message(tenant, room, sk, now).await
    }
}
