//! Tenant rules, as the processor sees them: the one interface [`pipeline`](crate::pipeline)
//! asks before [`react`](crate::react), and the plain data that crosses it. The WebAssembly
//! plugin host (crate `roomcast-plugin-host`) implements [`TenantRules`]; this crate links no
//! wasmtime, so the write-path Lambdas that share it do not either.
//!
//! * [`TenantRules`] — a message's decision and route, a welcome's greeting, and the plugin
//!   records' bookkeeping (activation, following each tenant's `ACTIVE` pointer).
//! * [`Limits`] — what one plugin call may use; [`CEILING`] caps any tenant's overrides
//!   ([`LimitOverrides`], kept on the version's record).
//! * [`CallReport`], [`CallRecord`] — what a call cost and said, for logs and replay.
//! * [`Lookups`] — a batch's one look-up of each tenant's `ACTIVE` pointer.
//! * [`Mode`] — execute, or dry run (replay): a dry run writes nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::model::{
    LimitOverrides, PLUGIN_CEILING as CEILING, PLUGIN_MIN_DEADLINE as MIN_DEADLINE, PluginLimits as Limits,
};
use crate::react::{Decision, Route};
use crate::store::StoreError;
use crate::stream::Change;

/// Whether the processor's work takes effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Deliver, delete, activate plugins and write their status: the Lambda, `roomcast dev`.
    #[default]
    Execute,
    /// Decide and report only: `roomcast replay` without `--execute`. Nothing is sent, deleted
    /// or written; plugin records are shown, not activated.
    DryRun,
}

/// A message, as a tenant's rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageInput {
    pub id: String,
    pub tenant: String,
    pub room: String,
    pub user_id: String,
    pub body: String,
    pub timestamp: String,
}

/// A connection asking to join a room, as a tenant's rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinInput {
    pub connection_id: String,
    pub tenant: String,
    pub user_id: String,
    pub room: String,
    /// The token's claims the `$connect` authorizer passed on, as name and value.
    pub claims: Vec<(String, String)>,
}

/// A tenant's answer to a join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinVerdict {
    Allow,
    /// The client gets `join_denied` with this reason.
    Deny(String),
}

/// The stream record a call is made for: its own time (never the clock: replay decides the
/// same) and its sequence number (plugin log lines carry it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordAt {
    pub time_ms: u64,
    pub sequence: String,
}

/// A tenant's configuration for its plugin (`roomcast plugin config set`): what `host.config`
/// reads.
pub type ConfigValues = Arc<std::collections::BTreeMap<String, String>>;

/// A new connection, as a tenant's rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WelcomeInput {
    pub connection_id: String,
    pub tenant: String,
    pub user_id: String,
    pub rooms: Vec<String>,
}

/// What a plugin record made (or, in a dry run, would make) this container's rules do: the
/// plugin lifecycle's effects, reported per record (replay prints them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginAction {
    /// The uploaded version compiled, became the tenant's plugin, and the `ACTIVE` pointer
    /// names it.
    Activated { tenant: String, version: String },
    /// A dry run: the table says this version is waiting to be activated.
    WouldActivate { tenant: String, version: String },
    /// The uploaded version cannot be a plugin; its status says why.
    Rejected { tenant: String, version: String, reason: String },
    /// The table no longer has this upload waiting (redelivered, superseded, or not in the
    /// table a replay reads): nothing.
    AlreadyHandled { tenant: String, version: String },
    /// This container now runs what the tenant's `ACTIVE` pointer names (`None`: no plugin).
    Followed { tenant: String, version: Option<String> },
}

impl std::fmt::Display for PluginAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginAction::Activated { tenant, version } => write!(f, "activate {tenant} version {version}"),
            PluginAction::WouldActivate { tenant, version } => {
                write!(f, "would activate {tenant} version {version} (a dry run activates nothing)")
            }
            PluginAction::Rejected { tenant, version, reason } => {
                write!(f, "reject {tenant} version {version}: {reason}")
            }
            PluginAction::AlreadyHandled { tenant, version } => {
                write!(f, "nothing: the table no longer has {tenant} version {version} waiting to be activated")
            }
            PluginAction::Followed { tenant, version: Some(v) } => write!(f, "{tenant} runs version {v}"),
            PluginAction::Followed { tenant, version: None } => write!(f, "{tenant} runs no plugin"),
        }
    }
}

/// A tenant's rules beside the data path.
///
/// Blame stays with the tenant: whatever its rules do, the answer is a decision (its failure
/// policy applied), never an error. Only the table being unavailable is an error, and only from
/// the bookkeeping methods.
#[async_trait::async_trait]
pub trait TenantRules: Send + Sync {
    /// A plugin record of the table (an upload, the `ACTIVE` pointer) arrived on the stream.
    /// Records are hints, redelivered and possibly late: what the table says now decides.
    async fn on_plugin_record(&self, change: &Change, mode: Mode) -> Result<Vec<PluginAction>, StoreError>;

    /// Makes this container run what the tenant's `ACTIVE` pointer names now. The pipeline
    /// calls it once per tenant per batch ([`Lookups`]).
    async fn refresh(&self, tenant: &str, mode: Mode) -> Result<(), StoreError>;

    /// The tenant's decision and route for a message; `None` when the tenant has no rules.
    async fn decide_message(&self, message: &MessageInput, at: &RecordAt)
    -> Option<(Decision, Route, Vec<CallRecord>)>;

    /// The tenant's greeting for a welcome; `None` when the tenant has no rules, or its rules
    /// do not greet.
    async fn greeting(&self, info: &WelcomeInput, at: &RecordAt) -> Option<(Option<String>, CallRecord)>;

    /// Whether the tenant's rules decide who joins its rooms. Known once the tenant's rules are
    /// loaded ([`TenantRules::refresh`]); a tenant without such rules pays nothing per join.
    async fn authorizes_joins(&self, tenant: &str) -> bool;

    /// The tenant's decision on a join; `None` when its rules do not decide joins (allowed).
    async fn authorize_join(&self, join: &JoinInput, at: &RecordAt) -> Option<(JoinVerdict, CallRecord)>;

    /// Per tenant, what its rules' calls cost since the last time this was asked (the batch's
    /// metrics).
    fn take_stats(&self) -> Vec<crate::metrics::PluginStats> {
        Vec::new()
    }
}

/// What a batch has looked up: per tenant, its one read of the `ACTIVE` pointer and of its
/// settings. Made with the batch and dropped with it.
#[derive(Clone, Default)]
pub struct Lookups {
    looked_up: PerTenant<()>,
    settings: PerTenant<Option<crate::model::TenantSettings>>,
    rooms: Arc<Mutex<std::collections::HashSet<(String, String)>>>,
    /// The batch's membership records per room, for presence runs.
    presence_runs: Arc<crate::presence::PresenceRuns>,
    /// Rooms the batch found past their announce limit (a join storm's memberships ahead of
    /// presence): their later `joined` records of the batch announce nothing without reading
    /// the room again.
    past_limit: Arc<Mutex<std::collections::HashSet<(String, String)>>>,
    /// The batch's webhook events, queued once it is done.
    webhooks: Arc<crate::webhook::Held>,
}

/// One look-up per tenant, shared by the records of a batch.
type PerTenant<T> = Arc<Mutex<HashMap<String, Arc<tokio::sync::OnceCell<T>>>>>;

impl Lookups {
    /// The batch's look-up of `tenant`'s `ACTIVE` pointer: the first record of the tenant runs
    /// it, the others (of other rooms, running at the same time) wait for it.
    pub fn look_up(&self, tenant: &str) -> Arc<tokio::sync::OnceCell<()>> {
        self.looked_up.lock().unwrap_or_else(|p| p.into_inner()).entry(tenant.to_string()).or_default().clone()
    }

    /// Lookups for a batch whose membership records are `runs`.
    pub fn with_presence_runs(runs: crate::presence::PresenceRuns) -> Lookups {
        Lookups { presence_runs: Arc::new(runs), ..Lookups::default() }
    }

    /// The batch's webhook events, held until it is done.
    pub fn webhooks(&self) -> &crate::webhook::Held {
        &self.webhooks
    }

    /// Marks a room the batch found past its announce limit.
    pub fn mark_past_limit(&self, tenant: &str, room: &str) {
        self.past_limit.lock().unwrap_or_else(|p| p.into_inner()).insert((tenant.to_string(), room.to_string()));
    }

    /// Whether the batch found the room past its announce limit.
    pub fn past_limit(&self, tenant: &str, room: &str) -> bool {
        self.past_limit.lock().unwrap_or_else(|p| p.into_inner()).contains(&(tenant.to_string(), room.to_string()))
    }

    /// The batch's membership records per room ([`crate::presence::PresenceRuns`]).
    pub fn presence_runs(&self) -> &crate::presence::PresenceRuns {
        &self.presence_runs
    }

    /// True the first time a batch asks about a room (its presence state is checked once).
    pub fn first_time_in_batch(&self, tenant: &str, room: &str) -> bool {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner()).insert((tenant.to_string(), room.to_string()))
    }

    /// The batch's one read of `tenant`'s settings, shared the same way.
    pub fn settings(&self, tenant: &str) -> Arc<tokio::sync::OnceCell<Option<crate::model::TenantSettings>>> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner()).entry(tenant.to_string()).or_default().clone()
    }
}

/// What a call cost and said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallReport {
    pub fuel_used: u64,
    pub elapsed: Duration,
    pub log: Vec<String>,
}

impl CallReport {
    /// This report with an earlier step's cost (instantiation) added in front.
    pub fn after(mut self, earlier: CallReport) -> CallReport {
        self.fuel_used += earlier.fuel_used;
        self.elapsed += earlier.elapsed;
        let mut log = earlier.log;
        log.append(&mut self.log);
        self.log = log;
        self
    }
}

/// One hook call as it happened, for logs and replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    /// `on-message`, `authorize-join`, `welcome`; a 0.1.0 plugin's message is `validate+route`.
    pub hook: &'static str,
    pub outcome: String,
    pub report: CallReport,
}
