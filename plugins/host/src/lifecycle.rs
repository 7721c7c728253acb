//! The plugin lifecycle: upload, activation and following each tenant's `ACTIVE` pointer, as
//! records in the table. [`PluginRules`] is what the processor asks
//! ([`roomcast_processor::rules::TenantRules`](roomcast_processor::rules::TenantRules)): it keeps this container's
//! [`Registry`] in step with the table, and asks the registry for decisions.
//!
//! * Upload ([`upload`]): the CLI checks a component as the processor will, then writes its
//!   chunks and metadata. Nothing else happens until the processor sees the metadata's INSERT.
//! * Activation: on that INSERT the processor reassembles, verifies and compiles the version,
//!   installs it, and records the outcome — `active` with the `ACTIVE` pointer, or `rejected`
//!   with the reason the tenant sees (`roomcast plugin list`).
//! * Following: many containers run at once, and a record reaches only one of them. The first
//!   time a batch meets a tenant, its `ACTIVE` pointer is read (once, [`Lookups`](roomcast_processor::rules::Lookups))
//!   and this container loads what it names, so an activation, rollback, disable or re-upload
//!   elsewhere takes effect here from the next batch on.
//!
//! A dry run (replay) activates nothing and writes nothing.

use std::sync::Arc;

use roomcast_processor::model::{FailurePolicy, PluginActive, PluginMeta, PluginStatus};
use roomcast_processor::react::{Decision, Route};
use roomcast_processor::rules::{
    CallRecord, JoinInput, JoinVerdict, MessageInput, Mode, PluginAction, RecordAt, TenantRules, WelcomeInput,
};
use roomcast_processor::store::{Store, StoreError};
use roomcast_processor::stream::{Change, Record};

use super::registry::{Policy, Registry};
use super::{JoinRequest, LimitOverrides, Limits, Message, Plugin, PluginHost, WelcomeInfo};

/// The tenants' plugins as the processor's [`TenantRules`]: this container's registry, kept in
/// step with the table.
pub struct PluginRules {
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
}

impl PluginRules {
    pub fn new(registry: Arc<Registry>, store: Arc<dyn Store>) -> PluginRules {
        PluginRules { registry, store }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Plugin records: activate an uploaded version, follow the `ACTIVE` pointer, disable.
    /// A component that cannot be a plugin is the tenant's fault: its status says why. Only the
    /// table being unavailable is an error. Records are redelivered and may be late, so each is
    /// only a hint: what the table says now decides.
    async fn plugin_record(&self, change: &Change, mode: Mode) -> Result<Vec<PluginAction>, StoreError> {
        let registry = &*self.registry;
        match change {
            // An upload, or a re-upload of an existing version (its settings may differ).
            Change::Inserted(Record::Plugin(meta)) | Change::Modified { new: Record::Plugin(meta), .. }
                if meta.status == PluginStatus::Uploaded =>
            {
                let (tenant, version) = (meta.tenant.clone(), meta.version.clone());
                let now = self.store.plugin(&meta.tenant, &meta.version).await?;
                let Some(meta) =
                    now.filter(|m| m.status == PluginStatus::Uploaded && m.uploaded_at == meta.uploaded_at)
                else {
                    tracing::info!(%tenant, %version, "upload already handled; not activating it again");
                    return Ok(vec![PluginAction::AlreadyHandled { tenant, version }]);
                };
                if mode == Mode::DryRun {
                    return Ok(vec![PluginAction::WouldActivate { tenant, version }]);
                }
                // The operator may have changed the pointer since the upload (a rollback, another
                // activation, a disable): that newer change stands. An older upload's activation
                // does not: of two uploads in a row, the later one wins.
                let pointer = self.store.active_plugin(&meta.tenant).await?;
                let uploaded = roomcast_processor::model::format_ts(&meta.uploaded_at);
                if let Some(based_on) = &meta.based_on
                    && !may_replace(pointer.as_ref(), based_on, &uploaded)
                {
                    return self.superseded(&meta, mode).await;
                }
                match self.compile_version(&meta).await? {
                    Ok(compiled) => {
                        let ours = pointer.as_ref().is_some_and(|p| {
                            p.version == meta.version && p.by_upload.as_deref() == Some(uploaded.as_str())
                        });
                        let revision = match &meta.based_on {
                            // Already written by this upload (a redelivery after a partial failure).
                            Some(_) if ours => pointer.as_ref().and_then(|p| p.revision.clone()),
                            // In one conditional write against the pointer just read: a change
                            // that landed while this version compiled wins.
                            Some(_) => {
                                let mut written = PluginActive::new(&meta.tenant, &meta.version);
                                written.by_upload = Some(uploaded.clone());
                                let expected = PluginActive::token(pointer.as_ref());
                                if !self.store.set_active_plugin_if(&written, &expected).await? {
                                    return self.superseded(&meta, mode).await;
                                }
                                written.revision
                            }
                            None => {
                                self.store.set_active_plugin(&meta.tenant, Some(&meta.version)).await?;
                                self.store.active_plugin(&meta.tenant).await?.and_then(|a| a.revision)
                            }
                        };
                        self.install(&meta, compiled);
                        self.mark_active(&meta.tenant, &meta.version).await?;
                        // This container has loaded what the new pointer names.
                        registry.set_revision(&meta.tenant, revision);
                        self.record_hooks(&meta.tenant, &meta.version, None).await?;
                        tracing::info!(%tenant, %version, "plugin activated");
                        Ok(vec![PluginAction::Activated { tenant, version }])
                    }
                    Err(reason) => {
                        tracing::warn!(%tenant, %version, %reason, "plugin rejected");
                        self.store
                            .set_plugin_status(&meta.tenant, &meta.version, PluginStatus::Rejected, Some(&reason))
                            .await?;
                        Ok(vec![PluginAction::Rejected { tenant, version, reason }])
                    }
                }
            }
            // A dry run leaves this container's plugins as the replay set them up.
            Change::Inserted(Record::PluginActive(active))
            | Change::Modified { new: Record::PluginActive(active), .. }
            | Change::Removed { old: Record::PluginActive(active), .. }
                if mode == Mode::Execute =>
            {
                self.follow_pointer(&active.tenant, mode).await?;
                let version = registry.installed_version(&active.tenant);
                Ok(vec![PluginAction::Followed { tenant: active.tenant.clone(), version }])
            }
            _ => Ok(Vec::new()),
        }
    }

    /// An upload the tenant's pointer moved on from before it was activated: kept, inactive,
    /// with the reason; this container runs what the pointer names.
    async fn superseded(&self, meta: &PluginMeta, mode: Mode) -> Result<Vec<PluginAction>, StoreError> {
        let (tenant, version) = (meta.tenant.clone(), meta.version.clone());
        let reason = "not activated: the tenant's active version changed after this upload (a newer activation, \
                      rollback or disable stands; `roomcast plugin activate` activates this one)";
        tracing::info!(%tenant, %version, "upload superseded by a newer change of the active version");
        self.store.set_plugin_status(&tenant, &version, PluginStatus::Inactive, Some(reason)).await?;
        self.follow_pointer(&tenant, mode).await?;
        Ok(vec![PluginAction::AlreadyHandled { tenant, version }])
    }

    /// Installs `version` of the tenant's plugin from the table.
    async fn ensure_version(&self, tenant: &str, version: &str, mode: Mode) -> Result<(), StoreError> {
        let Some(meta) = self.store.plugin(tenant, version).await? else {
            tracing::warn!(tenant, version, "the active plugin version has no record");
            return Ok(());
        };
        let loaded = self.load_version(&meta).await?;
        if mode == Mode::DryRun {
            if let Err(reason) = loaded {
                tracing::warn!(tenant, version, %reason, "the active plugin version cannot be loaded");
            }
        } else if let Err(reason) = loaded {
            self.store.set_plugin_status(tenant, version, PluginStatus::Rejected, Some(&reason)).await?;
        } else if meta.status != PluginStatus::Active {
            self.mark_active(tenant, version).await?;
        }
        Ok(())
    }

    /// Records `version` as the tenant's active one and whichever was active before as inactive.
    async fn mark_active(&self, tenant: &str, version: &str) -> Result<(), StoreError> {
        for other in self.store.plugins(tenant).await? {
            if other.version != version && other.status == PluginStatus::Active {
                self.store.set_plugin_status(tenant, &other.version, PluginStatus::Inactive, None).await?;
            }
        }
        self.store.set_plugin_status(tenant, version, PluginStatus::Active, None).await
    }

    /// Reassembles, verifies and compiles a version, and installs it. The inner error is the
    /// reason the tenant sees.
    async fn load_version(&self, meta: &PluginMeta) -> Result<Result<(), String>, StoreError> {
        Ok(self.compile_version(meta).await?.map(|compiled| self.install(meta, compiled)))
    }

    /// Reassembles, verifies and compiles a version, without installing it.
    async fn compile_version(&self, meta: &PluginMeta) -> Result<Result<(Plugin, Limits), String>, StoreError> {
        let registry = &*self.registry;
        let limits = registry.limits().with_overrides(&meta.limits.unwrap_or_default());
        // One load per version however many partitions ask at once (`Registry::load`).
        let read = async {
            let Some(bytes) = self.store.plugin_bytes(&meta.tenant, &meta.version, meta.chunks).await? else {
                return Ok(Err("the component's chunks are missing".to_string()));
            };
            let sha256 = super::sha256_hex(&bytes);
            if sha256 != meta.sha256 {
                return Ok(Err(format!(
                    "sha256 mismatch: the chunks hash to {sha256}, the record says {}",
                    meta.sha256
                )));
            }
            Ok(Ok(bytes))
        };
        let compiled = registry.load(&meta.tenant, &meta.version, &limits, read).await?;
        Ok(compiled.map(|plugin| (plugin, limits)))
    }

    /// Makes a compiled version this container's plugin for its tenant.
    fn install(&self, meta: &PluginMeta, (plugin, limits): (Plugin, Limits)) {
        let policy = match meta.policy {
            FailurePolicy::Open => Policy::FailOpen,
            FailurePolicy::Closed => Policy::FailClosed,
        };
        tracing::info!(
            tenant = %meta.tenant,
            version = %meta.version,
            from_artifact = plugin.from_artifact,
            fuel = limits.fuel,
            memory_bytes = limits.memory_bytes,
            deadline_ms = limits.deadline.as_millis() as u64,
            "plugin loaded"
        );
        self.registry.install(&meta.tenant, plugin, limits, policy, false);
    }

    /// Loads what an `ACTIVE` pointer names, unless this container runs exactly that already
    /// (the same version, loaded for the same revision of the pointer). A version this container
    /// cannot load leaves the tenant with no plugin — never an older one the pointer no longer
    /// names — and is not tried again until the pointer changes, or for `UNLOADABLE_TTL`.
    async fn follow(&self, active: &PluginActive, mode: Mode) -> Result<(), StoreError> {
        let registry = &*self.registry;
        let tenant = active.tenant.as_str();
        let wanted = (active.version.clone(), active.revision.clone());
        let current = registry.installed_version(tenant).as_deref() == Some(active.version.as_str())
            && registry.installed_revision(tenant) == active.revision;
        if current || registry.unloadable(tenant).as_ref() == Some(&wanted) {
            return Ok(());
        }
        self.ensure_version(tenant, &active.version, mode).await?;
        if registry.installed_version(tenant).as_deref() == Some(active.version.as_str()) {
            registry.set_revision(tenant, active.revision.clone());
            if mode == Mode::Execute {
                self.record_hooks(tenant, &active.version, active.authorizes_joins).await?;
            }
        } else {
            registry.remove(tenant);
            registry.set_unloadable(tenant, wanted);
            tracing::error!(
                tenant,
                version = %active.version,
                "the ACTIVE plugin version cannot be loaded; the tenant runs no plugin until its pointer changes (tried again in 10 minutes)"
            );
        }
        Ok(())
    }

    /// Tells `$connect` (through the `ACTIVE` pointer) whether the version decides joins, when
    /// the pointer does not say so already.
    async fn record_hooks(&self, tenant: &str, version: &str, recorded: Option<bool>) -> Result<(), StoreError> {
        let authorizes = self.registry.hooks(tenant).await.is_some_and(|h| h.contains(super::Hooks::AUTHORIZE_JOIN));
        if recorded != Some(authorizes) {
            self.store.set_authorizes_joins(tenant, version, authorizes).await?;
        }
        Ok(())
    }

    /// Follows the tenant's `ACTIVE` pointer as it is in the table now (one strongly consistent
    /// `GetItem`). Plugins pinned from files have no pointer to follow.
    async fn follow_pointer(&self, tenant: &str, mode: Mode) -> Result<(), StoreError> {
        let registry = &*self.registry;
        if registry.is_pinned(tenant) {
            return Ok(());
        }
        match self.store.active_plugin(tenant).await? {
            Some(active) => self.follow(&active, mode).await?,
            None => {
                if registry.installed_version(tenant).is_some() {
                    tracing::info!(tenant, "plugin disabled (no ACTIVE pointer)");
                }
                registry.remove(tenant);
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl TenantRules for PluginRules {
    async fn on_plugin_record(&self, change: &Change, mode: Mode) -> Result<Vec<PluginAction>, StoreError> {
        self.plugin_record(change, mode).await
    }

    async fn refresh(&self, tenant: &str, mode: Mode) -> Result<(), StoreError> {
        // The pointer and the configuration, read at the same time: one round trip per tenant
        // per batch, as before configuration existed.
        let (followed, config) = tokio::join!(self.follow_pointer(tenant, mode), self.store.plugin_config(tenant));
        followed?;
        self.registry.set_config(tenant, config?.map(|c| c.values).unwrap_or_default());
        Ok(())
    }

    async fn decide_message(
        &self,
        message: &MessageInput,
        at: &RecordAt,
    ) -> Option<(Decision, Route, Vec<CallRecord>)> {
        let message = Message {
            id: message.id.clone(),
            tenant: message.tenant.clone(),
            room: message.room.clone(),
            user_id: message.user_id.clone(),
            body: message.body.clone(),
            timestamp: message.timestamp.clone(),
        };
        self.registry.decide_message(&message, at).await
    }

    async fn greeting(&self, info: &WelcomeInput, at: &RecordAt) -> Option<(Option<String>, CallRecord)> {
        let info = WelcomeInfo {
            connection_id: info.connection_id.clone(),
            tenant: info.tenant.clone(),
            user_id: info.user_id.clone(),
            rooms: info.rooms.clone(),
        };
        self.registry.greeting(&info, at).await
    }

    async fn authorizes_joins(&self, tenant: &str) -> bool {
        self.registry.hooks(tenant).await.is_some_and(|h| h.contains(super::Hooks::AUTHORIZE_JOIN))
    }

    async fn authorize_join(&self, join: &JoinInput, at: &RecordAt) -> Option<(JoinVerdict, CallRecord)> {
        let request = JoinRequest {
            connection_id: join.connection_id.clone(),
            tenant: join.tenant.clone(),
            user_id: join.user_id.clone(),
            room: join.room.clone(),
            claims: join.claims.clone(),
        };
        self.registry.authorize_join(&request, at).await
    }

    fn take_stats(&self) -> Vec<roomcast_processor::metrics::PluginStats> {
        self.registry.take_stats()
    }
}

/// Whether an upload made over the pointer `based_on` may replace `pointer`: it is still that
/// pointer, or it is an older upload's activation (`by_upload` before this one's time). A
/// pointer an operator wrote after the upload — an activation, a rollback, a disable — stands.
fn may_replace(pointer: Option<&PluginActive>, based_on: &str, uploaded_at: &str) -> bool {
    PluginActive::token(pointer) == based_on
        || pointer.and_then(|p| p.by_upload.as_deref()).is_some_and(|by| by <= uploaded_at)
}

/// The processor with the tenants' plugins from `registry`, kept in step with its table.
pub trait WithPlugins {
    fn with_plugins(self, registry: Arc<Registry>) -> Self;
}

impl WithPlugins for roomcast_processor::pipeline::Processor {
    fn with_plugins(self, registry: Arc<Registry>) -> Self {
        let rules = PluginRules::new(registry, self.store().clone());
        self.with_rules(Arc::new(rules))
    }
}

/// `roomcast plugin upload`: checks a component as the processor will (size, a component, the
/// world, compiled here), then writes its chunks and metadata. The processor activates it on the
/// metadata's INSERT and records the outcome in its `status`.
pub async fn upload(
    store: &dyn roomcast_processor::store::Store,
    host: &PluginHost,
    tenant: &str,
    bytes: &[u8],
    policy: FailurePolicy,
    limits: LimitOverrides,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<roomcast_processor::model::PluginMeta> {
    roomcast_processor::model::Name::parse("tenant", tenant).map_err(|e| anyhow::anyhow!(e))?;
    let plugin = host.compile(bytes, &Limits::default())?;
    let mut meta = PluginMeta::new(tenant, &plugin.sha256, bytes.len(), policy, now);
    meta.limits = (!limits.is_empty()).then_some(limits);
    // The processor activates it only while the pointer is still this one.
    meta.based_on = Some(PluginActive::token(store.active_plugin(tenant).await?.as_ref()));
    let chunks = roomcast_processor::model::plugin_chunks(tenant, &meta.version, bytes);
    store.put_plugin(&meta, &chunks).await?;
    Ok(meta)
}
