//! A table made of ports: each concern ([`ConnectionStore`], [`MembershipStore`], …) answered by
//! a store of its own, every one by the same table unless replaced. A wrapper that changes one
//! concern — a fault injected into one read, a port answered from elsewhere — implements that
//! port alone and is set in its place:
//!
//! ```text
//! let table: Arc<dyn Store> = Parts::of(store.clone()).with_memberships(Arc::new(FailingRoom { inner: store })).into();
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    ConnectionStore, HistoryFrom, HistoryStore, MembershipStore, PluginStore, PresenceStore, Result, Store,
    TenantStore, UpkeepStore,
};
use crate::model::{
    Connection, IdempotencyRecord, LeftReason, Membership, Message, PluginActive, PluginChunk, PluginMeta,
    PluginStatus, RoomPresence, TenantSettings,
};
use crate::presence::{PresenceOutcome, PresenceUpdate, WhoPage};

/// The table's ports, each a store of its own.
#[derive(Clone)]
pub struct Parts {
    pub connections: Arc<dyn ConnectionStore>,
    pub memberships: Arc<dyn MembershipStore>,
    pub history: Arc<dyn HistoryStore>,
    pub presence: Arc<dyn PresenceStore>,
    pub plugins: Arc<dyn PluginStore>,
    pub tenants: Arc<dyn TenantStore>,
    pub upkeep: Arc<dyn UpkeepStore>,
}

impl Parts {
    /// Every port answered by `store`.
    pub fn of(store: Arc<dyn Store>) -> Parts {
        Parts {
            connections: store.clone(),
            memberships: store.clone(),
            history: store.clone(),
            presence: store.clone(),
            plugins: store.clone(),
            tenants: store.clone(),
            upkeep: store,
        }
    }

    /// Rooms' memberships and roster versions answered by `memberships`.
    pub fn with_memberships(self, memberships: Arc<dyn MembershipStore>) -> Parts {
        Parts { memberships, ..self }
    }

    /// Messages and history answered by `history`.
    pub fn with_history(self, history: Arc<dyn HistoryStore>) -> Parts {
        Parts { history, ..self }
    }

    /// Presence answered by `presence`.
    pub fn with_presence(self, presence: Arc<dyn PresenceStore>) -> Parts {
        Parts { presence, ..self }
    }

    /// Connections answered by `connections`.
    pub fn with_connections(self, connections: Arc<dyn ConnectionStore>) -> Parts {
        Parts { connections, ..self }
    }

    /// The sweeper's, the limits' and the fan-out's bookkeeping answered by `upkeep`.
    pub fn with_upkeep(self, upkeep: Arc<dyn UpkeepStore>) -> Parts {
        Parts { upkeep, ..self }
    }
}

impl From<Parts> for Arc<dyn Store> {
    fn from(parts: Parts) -> Arc<dyn Store> {
        Arc::new(parts)
    }
}

#[async_trait]
impl ConnectionStore for Parts {
    async fn put_connection(&self, conn: &Connection, memberships: &[Membership]) -> Result<()> {
        self.connections.put_connection(conn, memberships).await
    }
    async fn get_connection(&self, connection_id: &str, now: DateTime<Utc>) -> Result<Option<Connection>> {
        self.connections.get_connection(connection_id, now).await
    }
    async fn delete_connection(&self, connection_id: &str, reason: Option<LeftReason>) -> Result<Option<Connection>> {
        self.connections.delete_connection(connection_id, reason).await
    }
    async fn touch(&self, conn: &Connection, now: DateTime<Utc>, ttl: i64) -> Result<()> {
        self.connections.touch(conn, now, ttl).await
    }
    async fn user_connections(&self, tenant: &str, user_id: &str, now: DateTime<Utc>) -> Result<Vec<Connection>> {
        self.connections.user_connections(tenant, user_id, now).await
    }
    async fn scan_connections(&self, limit: usize, after: Option<&str>) -> Result<Vec<Connection>> {
        self.connections.scan_connections(limit, after).await
    }
    async fn set_status(&self, connection_id: &str, status: &str) -> Result<Option<Connection>> {
        self.connections.set_status(connection_id, status).await
    }
    async fn set_claims(
        &self,
        connection_id: &str,
        claims: &std::collections::BTreeMap<String, String>,
    ) -> Result<bool> {
        self.connections.set_claims(connection_id, claims).await
    }
}

#[async_trait]
impl MembershipStore for Parts {
    async fn join(&self, membership: &Membership) -> Result<bool> {
        self.memberships.join(membership).await
    }
    async fn leave(&self, connection_id: &str, tenant: &str, room: &str) -> Result<()> {
        self.memberships.leave(connection_id, tenant, room).await
    }
    async fn settle_join(&self, membership: &Membership, allowed: bool) -> Result<bool> {
        self.memberships.settle_join(membership, allowed).await
    }
    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>> {
        self.memberships.room_members(tenant, room, now).await
    }
    async fn bump_roster(&self, tenant: &str, room: &str) -> Result<()> {
        self.memberships.bump_roster(tenant, room).await
    }
    async fn roster_version(&self, tenant: &str, room: &str) -> Result<Option<u64>> {
        self.memberships.roster_version(tenant, room).await
    }
    async fn remove_membership(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        self.memberships.remove_membership(tenant, room, connection_id, reason).await
    }
    async fn mark_left(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        self.memberships.mark_left(tenant, room, connection_id, reason).await
    }
}

#[async_trait]
impl HistoryStore for Parts {
    async fn put_message(&self, message: &Message) -> Result<()> {
        self.history.put_message(message).await
    }
    async fn put_signal(&self, signal: &crate::model::Signal) -> Result<()> {
        self.history.put_signal(signal).await
    }
    async fn put_user_message(&self, message: &crate::model::UserMessage) -> Result<()> {
        self.history.put_user_message(message).await
    }
    async fn put_message_once(
        &self,
        message: &Message,
        record: &IdempotencyRecord,
        now: DateTime<Utc>,
    ) -> Result<Message> {
        self.history.put_message_once(message, record, now).await
    }
    async fn mark_message(&self, tenant: &str, room: &str, sk: &str, verdict: &crate::model::Verdict) -> Result<()> {
        self.history.mark_message(tenant, room, sk, verdict).await
    }
    async fn message(&self, tenant: &str, room: &str, sk: &str, now: DateTime<Utc>) -> Result<Option<Message>> {
        self.history.message(tenant, room, sk, now).await
    }
    async fn history(
        &self,
        tenant: &str,
        room: &str,
        from: &HistoryFrom,
        limit: usize,
        now: DateTime<Utc>,
        viewer: Option<&str>,
    ) -> Result<Vec<Message>> {
        self.history.history(tenant, room, from, limit, now, viewer).await
    }
    #[allow(clippy::too_many_arguments, reason = "history's arguments and the byte budget")]
    async fn history_page(
        &self,
        tenant: &str,
        room: &str,
        from: &HistoryFrom,
        limit: usize,
        now: DateTime<Utc>,
        viewer: Option<&str>,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        self.history.history_page(tenant, room, from, limit, now, viewer, max_bytes).await
    }
}

#[async_trait]
impl PresenceStore for Parts {
    async fn scan_presence(
        &self,
        limit: usize,
        after: Option<(String, String)>,
    ) -> Result<Vec<crate::model::Presence>> {
        self.presence.scan_presence(limit, after).await
    }
    async fn put_presence_suspects(&self, p: &crate::model::Presence) -> Result<bool> {
        self.presence.put_presence_suspects(p).await
    }
    async fn apply_presence(&self, update: &PresenceUpdate) -> Result<PresenceOutcome> {
        self.presence.apply_presence(update).await
    }
    async fn migrate_presence(&self, tenant: &str, room: &str) -> Result<bool> {
        self.presence.migrate_presence(tenant, room).await
    }
    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> Result<()> {
        self.presence.unannounce(tenant, room, user_id).await
    }
    async fn apply_presence_run(&self, updates: &[PresenceUpdate]) -> Result<Vec<PresenceOutcome>> {
        self.presence.apply_presence_run(updates).await
    }
    async fn who(&self, tenant: &str, room: &str, limit: usize, after: Option<&str>) -> Result<WhoPage> {
        self.presence.who(tenant, room, limit, after).await
    }
    async fn presence(&self, tenant: &str, room: &str, user_id: &str) -> Result<Option<crate::model::Presence>> {
        self.presence.presence(tenant, room, user_id).await
    }
    async fn room_presence(&self, tenant: &str, room: &str) -> Result<Option<RoomPresence>> {
        self.presence.room_presence(tenant, room).await
    }
}

#[async_trait]
impl PluginStore for Parts {
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> Result<()> {
        self.plugins.set_authorizes_joins(tenant, version, authorizes).await
    }
    async fn put_plugin(&self, meta: &PluginMeta, chunks: &[PluginChunk]) -> Result<()> {
        self.plugins.put_plugin(meta, chunks).await
    }
    async fn plugin_bytes(&self, tenant: &str, version: &str, chunks: usize) -> Result<Option<Vec<u8>>> {
        self.plugins.plugin_bytes(tenant, version, chunks).await
    }
    async fn plugin(&self, tenant: &str, version: &str) -> Result<Option<PluginMeta>> {
        self.plugins.plugin(tenant, version).await
    }
    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginMeta>> {
        self.plugins.plugins(tenant).await
    }
    async fn set_plugin_status(
        &self,
        tenant: &str,
        version: &str,
        status: PluginStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        self.plugins.set_plugin_status(tenant, version, status, reason).await
    }
    async fn active_plugin(&self, tenant: &str) -> Result<Option<PluginActive>> {
        self.plugins.active_plugin(tenant).await
    }
    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> Result<()> {
        self.plugins.set_active_plugin(tenant, version).await
    }
    async fn set_active_plugin_if(&self, pointer: &PluginActive, expected: &str) -> Result<bool> {
        self.plugins.set_active_plugin_if(pointer, expected).await
    }
    async fn plugin_config(&self, tenant: &str) -> Result<Option<crate::model::PluginConfig>> {
        self.plugins.plugin_config(tenant).await
    }
    async fn put_plugin_config(&self, config: &crate::model::PluginConfig) -> Result<()> {
        self.plugins.put_plugin_config(config).await
    }
}

#[async_trait]
impl TenantStore for Parts {
    async fn tenant_settings(&self, tenant: &str) -> Result<Option<TenantSettings>> {
        self.tenants.tenant_settings(tenant).await
    }
    async fn tenant_identity(&self, tenant: &str) -> Result<Option<crate::model::TenantIdentity>> {
        self.tenants.tenant_identity(tenant).await
    }
    async fn put_tenant_identity(&self, identity: &crate::model::TenantIdentity) -> Result<()> {
        self.tenants.put_tenant_identity(identity).await
    }
    async fn put_tenant_settings(&self, settings: &TenantSettings) -> Result<()> {
        self.tenants.put_tenant_settings(settings).await
    }
}

#[async_trait]
impl UpkeepStore for Parts {
    async fn count_in_window(&self, key: &str, window: i64) -> Result<u64> {
        self.upkeep.count_in_window(key, window).await
    }
    async fn stale_connections(&self, shard: u32, cutoff: DateTime<Utc>) -> Result<Vec<Connection>> {
        self.upkeep.stale_connections(shard, cutoff).await
    }
    async fn present_users(&self, shard: u32) -> Result<Vec<crate::model::Presence>> {
        self.upkeep.present_users(shard).await
    }
    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> Result<Option<u32>> {
        self.upkeep.take_sweep_lease(now, until, owner).await
    }
    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> Result<bool> {
        self.upkeep.sweep_progress(owner, next_shard, release).await
    }
    async fn mark_seen(&self, connection_id: &str, now: DateTime<Utc>) -> Result<()> {
        self.upkeep.mark_seen(connection_id, now).await
    }
    async fn fanout_progress(&self, key: &str) -> Result<Option<crate::model::FanoutProgress>> {
        self.upkeep.fanout_progress(key).await
    }
    async fn put_fanout_progress(&self, progress: &crate::model::FanoutProgress) -> Result<()> {
        self.upkeep.put_fanout_progress(progress).await
    }
}
