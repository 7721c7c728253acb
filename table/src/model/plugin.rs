//! Tenant plugins as records: each version's metadata, its chunks, the `ACTIVE` pointer.

use super::*;

// Tenant plugins, as records: `TENANT#{tenant}` holds each uploaded version's metadata
// (`PLUGIN#{version}#META`), its chunks under a prefix of their own (`CHUNK#{version}#{index}`:
// a component can be 4 MiB, an item at most 400 KB) and the `ACTIVE` pointer. Finding a version
// is one `GetItem`; listing versions reads metadata only, never a chunk.

/// The largest chunk of a component in one item, leaving room under DynamoDB's 400 KB.
pub const PLUGIN_CHUNK_BYTES: usize = 300 * 1024;

pub fn tenant_pk(tenant: &str) -> String {
    format!("TENANT#{tenant}")
}

pub fn plugin_meta_sk(version: &str) -> String {
    format!("PLUGIN#{version}#META")
}

pub fn plugin_chunk_sk(version: &str, index: usize) -> String {
    format!("CHUNK#{version}#{index:04}")
}

/// Where versions uploaded before chunks had their own prefix keep them (read, never written).
pub fn legacy_plugin_chunk_sk(version: &str, index: usize) -> String {
    format!("PLUGIN#{version}#CHUNK#{index:04}")
}

pub const PLUGIN_ACTIVE_SK: &str = "ACTIVE";

/// Where an uploaded version stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginStatus {
    /// Written; the processor has not activated it yet.
    Uploaded,
    /// Compiled and checked by the processor; the tenant's plugin.
    Active,
    /// The processor refused it (`reason` says why).
    Rejected,
    /// Was active; another version is, or the tenant's plugin is disabled.
    Inactive,
}

/// What a tenant does when its plugin faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Deliver by the default rules.
    Open,
    /// Reject the message.
    Closed,
}

/// One uploaded version of a tenant's plugin (its bytes are in the chunks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginMeta {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub version: String,
    pub sha256: String,
    pub size: usize,
    pub chunks: usize,
    pub status: PluginStatus,
    pub policy: FailurePolicy,
    #[serde(with = "ts_format")]
    pub uploaded_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per-tenant limits set at upload; unset, the deployment's apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitOverrides>,
    /// What the tenant's `ACTIVE` pointer was when this was uploaded ([`PluginActive::token`]):
    /// the processor activates the upload only while the pointer is still that, so an
    /// activation, rollback or disable made after the upload (and before the processor got to
    /// it) is never undone by it. Absent on uploads by CLIs before it: activated as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub based_on: Option<String>,
}

impl PluginMeta {
    /// Versions are content-addressed: the first 16 hex digits of the sha256.
    pub fn new(tenant: &str, sha256: &str, size: usize, policy: FailurePolicy, now: DateTime<Utc>) -> PluginMeta {
        let version = sha256[..16.min(sha256.len())].to_string();
        PluginMeta {
            pk: tenant_pk(tenant),
            sk: plugin_meta_sk(&version),
            record_type: "plugin".into(),
            tenant: tenant.to_string(),
            version,
            sha256: sha256.to_string(),
            size,
            chunks: size.div_ceil(PLUGIN_CHUNK_BYTES),
            status: PluginStatus::Uploaded,
            policy,
            uploaded_at: now,
            reason: None,
            limits: None,
            based_on: None,
        }
    }
}

/// One piece of a component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginChunk {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub index: usize,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The chunks of a component, in order.
pub fn plugin_chunks(tenant: &str, version: &str, bytes: &[u8]) -> Vec<PluginChunk> {
    bytes
        .chunks(PLUGIN_CHUNK_BYTES)
        .enumerate()
        .map(|(index, data)| PluginChunk {
            pk: tenant_pk(tenant),
            sk: plugin_chunk_sk(version, index),
            record_type: "plugin-chunk".into(),
            index,
            data: data.to_vec(),
        })
        .collect()
}

/// Which version a tenant runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginActive {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub version: String,
    /// New on every write of the pointer (an activation, a rollback, a re-upload of the active
    /// version with other settings): every processor container compares it once per batch and
    /// reloads when it changed. Absent on pointers written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Whether the version it names decides joins (`authorize-join`), as the processor found
    /// when it loaded it: `$connect` reads it to know whether joins must wait for a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorizes_joins: Option<bool>,
    /// When the processor wrote it activating an upload: that upload's `uploadedAt`. An upload
    /// made after it may still replace it (two uploads in a row: the later one wins); a pointer
    /// an operator wrote (activate, rollback) has none, and stands against older uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_upload: Option<String>,
}

impl PluginActive {
    pub fn new(tenant: &str, version: &str) -> PluginActive {
        PluginActive {
            pk: tenant_pk(tenant),
            sk: PLUGIN_ACTIVE_SK.into(),
            record_type: "plugin-active".into(),
            tenant: tenant.to_string(),
            version: version.to_string(),
            revision: Some(uuid::Uuid::now_v7().to_string()),
            authorizes_joins: None,
            by_upload: None,
        }
    }
}

impl PluginActive {
    /// What identifies one write of a tenant's pointer, `pointer` (`None`: there is none): its
    /// revision, or for a pointer written before revisions the version it names.
    pub fn token(pointer: Option<&PluginActive>) -> String {
        match pointer {
            None => NO_POINTER.into(),
            Some(PluginActive { revision: Some(revision), .. }) => revision.clone(),
            Some(PluginActive { version, .. }) => format!("{UNREVISED}{version}"),
        }
    }
}

/// [`PluginActive::token`] when the tenant has no pointer (no plugin, or disabled).
pub const NO_POINTER: &str = "none";
/// [`PluginActive::token`]'s prefix for a pointer written before revisions.
pub const UNREVISED: &str = "version:";

/// Per-tenant plugin limits, stored with an uploaded version (`roomcast plugin upload --fuel …`).
/// Unset fields take the deployment's value; set ones are capped at
/// `roomcast_processor::rules::CEILING`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_extra_rooms: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_only_users: Option<usize>,
}

impl LimitOverrides {
    pub fn is_empty(&self) -> bool {
        *self == LimitOverrides::default()
    }
}

// What one plugin call may use: the deployment's defaults (the configuration), a version's
// overrides, the ceiling over both. The processor's `rules` gives them as `Limits`, `CEILING`
// and `MIN_DEADLINE`.

/// The shortest deadline a call may have.
pub const PLUGIN_MIN_DEADLINE: std::time::Duration = std::time::Duration::from_millis(5);

/// Per-call limits, in the spirit of Shopify Functions' budget. The deployment sets the defaults
/// (`ROOMCAST_PLUGIN_*`); an uploaded version may carry [`LimitOverrides`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginLimits {
    /// Fuel per call (roughly, wasm instructions).
    pub fuel: u64,
    /// Wall-clock backstop per call, for time spent outside fuel (host calls).
    pub deadline: std::time::Duration,
    /// Linear memory and tables, in bytes.
    pub memory_bytes: usize,
    /// The largest component accepted for compilation.
    pub component_bytes: usize,
    /// The largest input (message) and output (rewrite, reason, greeting, routing) of a call.
    pub io_bytes: usize,
    /// The call's log, in bytes.
    pub log_bytes: usize,
    /// Rooms a `route` may add (after dropping repeats and the message's own room).
    pub max_extra_rooms: usize,
    /// Users a `route` may narrow a message to.
    pub max_only_users: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            fuel: 10_000_000,
            deadline: std::time::Duration::from_millis(100),
            memory_bytes: 16 << 20,
            component_bytes: 4 << 20,
            io_bytes: 128 << 10,
            log_bytes: 1 << 10,
            max_extra_rooms: 8,
            max_only_users: 100,
        }
    }
}

/// The most any tenant's overrides may ask for, whatever they say: one plugin call must never be
/// able to hold a processor for long or take a large share of its memory.
pub const PLUGIN_CEILING: PluginLimits = PluginLimits {
    fuel: 200_000_000,
    deadline: std::time::Duration::from_secs(1),
    memory_bytes: 128 << 20,
    component_bytes: 4 << 20,
    io_bytes: 128 << 10,
    log_bytes: 16 << 10,
    max_extra_rooms: 64,
    max_only_users: 1000,
};

impl PluginLimits {
    /// These limits with a tenant's overrides applied, each capped at [`PLUGIN_CEILING`].
    pub fn with_overrides(&self, o: &LimitOverrides) -> PluginLimits {
        PluginLimits {
            fuel: o.fuel.unwrap_or(self.fuel).clamp(1, PLUGIN_CEILING.fuel),
            deadline: o
                .deadline_ms
                .map_or(self.deadline, std::time::Duration::from_millis)
                .clamp(PLUGIN_MIN_DEADLINE, PLUGIN_CEILING.deadline),
            memory_bytes: o
                .memory_mib
                .map_or(self.memory_bytes, |m| m << 20)
                .clamp(1 << 20, PLUGIN_CEILING.memory_bytes),
            log_bytes: o.log_bytes.unwrap_or(self.log_bytes).min(PLUGIN_CEILING.log_bytes),
            max_extra_rooms: o.max_extra_rooms.unwrap_or(self.max_extra_rooms).min(PLUGIN_CEILING.max_extra_rooms),
            max_only_users: o.max_only_users.unwrap_or(self.max_only_users).min(PLUGIN_CEILING.max_only_users),
            ..self.clone()
        }
    }
}
