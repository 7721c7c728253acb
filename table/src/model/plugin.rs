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
        }
    }
}

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
